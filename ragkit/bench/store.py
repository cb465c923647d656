"""`ragkit bench store`: what the KV store costs per entry, next to the floor it cannot beat.

For SmolLM2-135M-shaped entries (30 layers, 3 KV heads, head dim 64) of several lengths it times,
in one run: a write-through put (safetensors + sha256 + fsync + rename), a verified disk get from
a freshly opened store (files in the OS page cache), the sha256 alone, a plain read of the file's
bytes (the floor for any loader that copies), and a host-memory hit.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from chunk_cache.disk import checksum
from chunk_cache.store import CacheKey, ChunkKV, KVStore

SHAPE = {"layers": 30, "kv_heads": 3, "head_dim": 64}  # SmolLM2-135M


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(tokens: tuple[int, ...] = (128, 512, 2048), dtypes: tuple[str, ...] = ("float32", "bfloat16"),
        entries: int = 4, repeats: int = 5, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for dtype in dtypes:
        for length in tokens:
            shape = (SHAPE["layers"], SHAPE["kv_heads"], length, SHAPE["head_dim"])
            kvs = [ChunkKV(torch.randn(shape).to(getattr(torch, dtype)), torch.randn(shape).to(getattr(torch, dtype)),
                           start=0, extras={"inter": torch.rand(length)}) for _ in range(entries)]
            keys = [CacheKey("bench", dtype, "prefix", f"{length}-{i}") for i in range(entries)]
            with tempfile.TemporaryDirectory() as tmp:
                writer = KVStore(Path(tmp), "bench", host_bytes=0)
                put_s = []
                for key, kv in zip(keys, kvs):
                    start = time.perf_counter()
                    writer.put(key, kv)
                    put_s.append(time.perf_counter() - start)
                files = sorted(Path(tmp).rglob("*.safetensors"))

                def disk_gets():
                    reader = KVStore(Path(tmp), "bench", host_bytes=0)
                    for key in keys:
                        assert reader.get(key) is not None

                def read_files():
                    for path in files:
                        path.read_bytes()

                def checksums():
                    for kv in kvs:
                        checksum(kv.tensors(), {})

                disk_gets()  # page cache warm, like the generator bench
                get_s = _median_s(disk_gets, repeats) / entries
                read_s = _median_s(read_files, repeats) / entries
                sha_s = _median_s(checksums, repeats) / entries
                host = KVStore(None, "bench")
                host.put(keys[0], kvs[0])
                hit_s = _median_s(lambda: host.get(keys[0]), repeats * 20)
                nbytes = files[0].stat().st_size
            rows.append({"dtype": dtype, "tokens": length, "entry_bytes": nbytes,
                         "put_ms": 1e3 * statistics.median(put_s), "disk_get_ms": 1e3 * get_s,
                         "sha256_ms": 1e3 * sha_s, "plain_read_ms": 1e3 * read_s, "host_hit_us": 1e6 * hit_s,
                         "disk_get_gb_s": nbytes / get_s / 1e9, "get_vs_plain_read": get_s / read_s})
    return {"shape": SHAPE, "entries": entries, "repeats": repeats, "threads": torch.get_num_threads(), "rows": rows}


def format_report(result: dict) -> str:
    lines = [f"KV store, SmolLM2-135M-shaped entries ({result['shape']['layers']} layers x "
             f"{result['shape']['kv_heads']} KV heads x {result['shape']['head_dim']}), medians over "
             f"{result['entries']} entries x {result['repeats']} repeats; disk reads from the page cache",
             f"{'dtype':<9}{'tokens':>7}{'entry':>10}{'put':>9}{'disk get':>10}{'sha256':>9}{'plain read':>11}"
             f"{'get/read':>9}{'GB/s':>7}{'host hit':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['dtype']:<9}{r['tokens']:>7}{r['entry_bytes'] / 2**20:>8.1f}MB{r['put_ms']:>7.1f}ms"
                     f"{r['disk_get_ms']:>8.1f}ms{r['sha256_ms']:>7.1f}ms{r['plain_read_ms']:>9.1f}ms"
                     f"{r['get_vs_plain_read']:>8.2f}x{r['disk_get_gb_s']:>7.2f}{r['host_hit_us']:>8.1f}us")
    return "\n".join(lines)
