"""Kill a process that is filling the store with SIGKILL at random moments: afterwards every entry on
disk must load complete and bit-exact (atomic publish), and the folder must reopen cleanly."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import torch

from chunk_cache.disk import JOURNAL
from chunk_cache.store import CacheKey, ChunkKV, KVStore

MODEL = "crash-test-model"
KEYS = 40
TRIALS = 24


def key(n: int) -> CacheKey:
    return CacheKey(MODEL, "float32", "prefix", f"chunk{n}")


def kv(n: int) -> ChunkKV:
    gen = torch.Generator().manual_seed(n)
    shape = (2, 2, 512, 8)  # 64 KB per tensor: big enough that writes take a while
    return ChunkKV(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), n,
                   {"inter": torch.rand(512, generator=gen)})


def warm_until_killed(root: str, ready) -> None:
    torch.set_num_threads(1)
    # Room for about 25 of the 40 entries, so eviction (unlink + journal) also gets interrupted.
    store = KVStore(root, MODEL, host_bytes=0, disk_bytes=25 * 134_000, eviction="value")
    entries = [kv(n) for n in range(KEYS)]
    ready.set()
    rng = random.Random(os.getpid())
    while True:
        n = rng.randrange(KEYS)
        store.put(key(n), entries[n], recompute_cost_s=rng.random())
        store.get(key(rng.randrange(KEYS)))


def test_sigkill_while_warming_never_leaves_a_half_entry(tmp_path):
    root = tmp_path / "kv"
    expected = {key(n).digest(): n for n in range(KEYS)}
    ctx = multiprocessing.get_context("fork")  # the child starts in milliseconds: no second torch import
    rng = random.Random(1234)
    leftovers = 0
    verified = 0
    started = time.perf_counter()
    for _ in range(TRIALS):
        ready = ctx.Event()
        child = ctx.Process(target=warm_until_killed, args=(str(root), ready), daemon=True)
        child.start()
        assert ready.wait(30), "the warming process did not start"
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        leftovers += len(list(root.rglob("*.tmp-*")))

        store = KVStore(root, MODEL, host_bytes=0)  # reopening reconciles and removes dead temp files
        assert not list(root.rglob("*.tmp-*"))
        files = [p.name.removesuffix(".safetensors") for p in root.rglob("*.safetensors")]
        assert set(files) <= set(expected)
        for digest in files:
            loaded = store.get(key(expected[digest]))
            want = kv(expected[digest])
            assert loaded is not None, f"entry {digest} was on disk but did not load"
            assert torch.equal(loaded.keys, want.keys) and torch.equal(loaded.values, want.values)
            assert loaded.start == want.start and torch.equal(loaded.extras["inter"], want.extras["inter"])
            verified += 1
        stats = store.stats()["tiers"]["disk"]
        assert stats["dropped"] == {}
        assert stats["entries"] == len(files)
        store.flush()
        assert (root / JOURNAL).exists()
    assert verified > TRIALS  # the kills left real entries to check
    print(f"{TRIALS} kills, {verified} entry loads verified, {leftovers} dead temp files cleaned, "
          f"{time.perf_counter() - started:.1f}s")


def test_a_journal_compaction_killed_halfway_leaves_no_temp_file_after_reopening(tmp_path):
    """Compaction rewrites the journal by temp file + rename; a writer killed in between leaves the temp
    file, which the next open removes (a live writer's is left alone)."""
    root = tmp_path / "kv"
    KVStore(root, MODEL)
    dead = root / ".journal.jsonl.tmp-999999999-abcdef12"  # no such process
    live = root / f".journal.jsonl.tmp-{os.getpid()}-abcdef12"
    dead.write_bytes(b'{"op": "put"')
    live.write_bytes(b"")
    KVStore(root, MODEL)
    assert not dead.exists() and live.exists()
