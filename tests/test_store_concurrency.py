"""Two processes warm and read one cache folder at the same time: nothing lost, nothing corrupted."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from pathlib import Path

import pytest
import torch

from chunk_cache.store import CacheKey, ChunkKV, KVStore, cache_stats

MODEL = "concurrency-test-model"
ALL_KEYS = 60
ENTRY_FILE_BYTES = 68_000  # one entry file: 2 x 32 KB tensors + extras + header
READS_PER_PUT = 20  # enough hit records to make the shared journal compact while both write


def key(n: int) -> CacheKey:
    return CacheKey(MODEL, "float32", "prefix", f"chunk{n}")


def kv(n: int) -> ChunkKV:
    gen = torch.Generator().manual_seed(n)
    shape = (2, 2, 256, 8)
    return ChunkKV(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), n,
                   {"inter": torch.rand(256, generator=gen)})


def matches(got: ChunkKV, n: int) -> bool:
    want = kv(n)
    return (got.start == want.start and torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
            and torch.equal(got.extras["inter"], want.extras["inter"]))


def warm_and_read(root: str, first: int, last: int, disk_bytes: int, eviction: str, start_together,
                  result: str) -> None:
    """Put chunks first..last-1 in shuffled order, reading random chunks after each put."""
    torch.set_num_threads(1)
    rng = random.Random(os.getpid())
    order = list(range(first, last))
    rng.shuffle(order)
    start_together.wait()
    store = KVStore(root, MODEL, host_bytes=4 * kv(0).nbytes(), disk_bytes=disk_bytes, eviction=eviction)
    hits = wrong = 0
    for n in order:
        store.put(key(n), kv(n), recompute_cost_s=0.1)
        for m in (rng.randrange(ALL_KEYS) for _ in range(READS_PER_PUT)):
            got = store.get(key(m))
            if got is not None:
                hits += 1
                wrong += not matches(got, m)
    del store  # a store going away writes its queued hit records
    Path(result).write_text(json.dumps({"hits": hits, "wrong": wrong}))


def run_workers(tmp_path: Path, ranges: list[tuple[int, int]], disk_bytes: int, eviction: str = "lru") -> list[dict]:
    # fork: separate processes (own file locks and descriptors) without paying a torch import each
    ctx = multiprocessing.get_context("fork")
    start_together = ctx.Barrier(len(ranges))
    procs = [ctx.Process(target=warm_and_read, args=(str(tmp_path / "kv"), first, last, disk_bytes, eviction,
                                                     start_together, str(tmp_path / f"result{i}.json")))
             for i, (first, last) in enumerate(ranges)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    return [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(len(ranges))]


def test_two_processes_warming_one_folder_lose_and_corrupt_nothing(tmp_path):
    results = run_workers(tmp_path, [(0, 40), (20, 60)], disk_bytes=1 << 30)  # 20..39 written by both
    assert [r["wrong"] for r in results] == [0, 0]
    assert all(r["hits"] > 0 for r in results)
    store = KVStore(tmp_path / "kv", MODEL, host_bytes=0)
    for n in range(ALL_KEYS):
        got = store.get(key(n))
        assert got is not None, f"chunk {n} was lost"
        assert matches(got, n)
    disk = store.stats()["tiers"]["disk"]
    assert disk["entries"] == ALL_KEYS and disk["dropped"] == {}
    del store
    # Every read of either worker, and of the check above, reached the shared journal.
    assert cache_stats(tmp_path / "kv")["hits"] == sum(r["hits"] for r in results) + ALL_KEYS


@pytest.mark.parametrize("eviction", ["lru", "value"])
def test_two_processes_evicting_under_a_tight_budget_stay_consistent(tmp_path, eviction):
    budget = 12 * ENTRY_FILE_BYTES
    results = run_workers(tmp_path, [(0, 40), (20, 60)], disk_bytes=budget, eviction=eviction)
    assert [r["wrong"] for r in results] == [0, 0]
    files = list((tmp_path / "kv").rglob("*.safetensors"))
    assert files and sum(p.stat().st_size for p in files) <= budget
    store = KVStore(tmp_path / "kv", MODEL, host_bytes=0, disk_bytes=budget, eviction=eviction)
    assert sum(store.get(key(n)) is not None for n in range(ALL_KEYS)) == len(files)
    assert store.stats()["tiers"]["disk"]["dropped"] == {}
