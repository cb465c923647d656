"""KV store: keys, round trips, tiers, eviction (against a reference LRU), integrity, manifest, stats."""

from __future__ import annotations

import json
import os
import random
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from chunk_cache.disk import ENTRIES, JOURNAL, MANIFEST, DiskTier
from chunk_cache.eviction import LRUPolicy
from chunk_cache.store import CacheKey, ChunkKV, KVStore, MemoryTier, cache_stats, clear_cache
from ragkit.errors import IndexMismatchError, InputError

MODEL = "smollm2-test-fingerprint"


def make_key(n: int, model: str = MODEL, dtype: str = "float32") -> CacheKey:
    return CacheKey(model, dtype, context_hash="context0", chunk_hash=f"chunk{n}")


def make_kv(seed: int, tokens: int = 8, dtype: torch.dtype = torch.float32) -> ChunkKV:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 1, tokens, 4)  # [L, H_kv, T, D]
    return ChunkKV(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype),
                   start=seed % 7, extras={"inter": torch.rand(tokens, generator=gen)})


def same(a: ChunkKV, b: ChunkKV) -> bool:
    return (torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and a.start == b.start
            and a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras))


def entry_path(root: Path, key: CacheKey) -> Path:
    digest = key.digest()
    return root / ENTRIES / digest[:2] / f"{digest}.safetensors"


ENTRY_BYTES = make_kv(0).nbytes()  # 288 bytes: every make_kv(tokens=8) entry has this size


# -- keys ---------------------------------------------------------------------------------------
def test_digest_is_stable_hex_and_covers_every_field():
    key = CacheKey("m", "float32", "p", "c")
    # File names must not change between releases, or every existing cache would be orphaned.
    assert key.digest() == "6f9810596006329420f9a44e0a00c506e3a76a05efe7c42b581cf2c7ac3ee57e"
    digests = {key.digest(), CacheKey("m2", "float32", "p", "c").digest(), CacheKey("m", "bfloat16", "p", "c").digest(),
               CacheKey("m", "float32", "p2", "c").digest(), CacheKey("m", "float32", "p", "c2").digest(),
               CacheKey("m", "float32", "pc", "").digest()}
    assert len(digests) == 6
    assert all(len(d) == 64 and set(d) <= set("0123456789abcdef") for d in digests)


def test_hostile_key_fields_cannot_escape_the_cache_folder(tmp_path):
    root = tmp_path / "kv"
    store = KVStore(root, "../../evil")
    key = CacheKey("../../evil", "float32", "/etc/passwd", "..\\..\\x\0y")
    store.put(key, make_kv(1))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(root in p.parents for p in files)
    assert entry_path(root, key).is_file()


# -- round trips --------------------------------------------------------------------------------
def test_memory_only_store_round_trip_and_miss():
    store = KVStore(None, MODEL)
    kv = make_kv(1)
    assert store.get(make_key(1)) is None and make_key(1) not in store
    store.put(make_key(1), kv)
    assert make_key(1) in store
    assert same(store.get(make_key(1)), kv)
    assert store.stats()["tiers"].keys() == {"host"}


@pytest.mark.parametrize("dtype,name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
def test_disk_round_trip_is_bit_exact_across_processes_views(tmp_path, dtype, name):
    kv = make_kv(3, tokens=5, dtype=dtype)
    KVStore(tmp_path / "kv", MODEL).put(make_key(3, dtype=name), kv, recompute_cost_s=0.25)
    fresh = KVStore(tmp_path / "kv", MODEL)  # nothing in memory: must come from disk
    assert make_key(3, dtype=name) in fresh
    loaded = fresh.get(make_key(3, dtype=name))
    assert loaded is not None and loaded.keys.dtype == dtype and same(loaded, kv)
    assert fresh.stats()["tiers"]["disk"]["hits"] == 1
    assert cache_stats(tmp_path / "kv")["models"][MODEL]["dtypes"] == [name]


def test_to_the_same_device_is_free():
    kv = make_kv(1)
    assert kv.to("cpu") is kv and kv.to(torch.device("cpu")) is kv


def test_put_rejects_tensors_that_do_not_match_the_key():
    store = KVStore(None, MODEL)
    with pytest.raises(ValueError, match="dtype"):
        store.put(make_key(1, dtype="bfloat16"), make_kv(1))
    with pytest.raises(ValueError, match="model"):
        store.put(make_key(1, model="other"), make_kv(1))
    bad = make_kv(1)
    bad.values = bad.values[:, :, :3]
    with pytest.raises(ValueError, match="layers"):
        store.put(make_key(1), bad)


# -- eviction -----------------------------------------------------------------------------------
def lru_traffic(store: KVStore, seed: int, steps: int, keys: int, capacity: int, put_share: float):
    """Random puts and gets against `store`, checked step by step against a reference LRU of
    `capacity` entries; yields the reference's resident keys after each step."""
    rng = random.Random(seed)
    reference: OrderedDict[int, None] = OrderedDict()
    for _ in range(steps):
        n = rng.randrange(keys)
        if rng.random() < put_share:
            store.put(make_key(n), make_kv(n))
            reference[n] = None
            reference.move_to_end(n)
            while len(reference) > capacity:
                reference.popitem(last=False)
        else:
            got = store.get(make_key(n))
            assert (got is not None) == (n in reference)
            if n in reference:
                assert same(got, make_kv(n))
                reference.move_to_end(n)
        yield set(reference)


def test_host_tier_matches_a_reference_lru_under_random_traffic():
    capacity = 5
    store = KVStore(None, MODEL, host_bytes=capacity * ENTRY_BYTES)
    for reference in lru_traffic(store, seed=0, steps=400, keys=12, capacity=capacity, put_share=0.5):
        resident = {e["digest"] for e in store.stats()["entries"]}
        assert resident == {make_key(m).digest() for m in reference}


def test_value_policy_keeps_a_costly_entry_that_lru_evicts():
    def run(policy: str) -> set[int]:
        store = KVStore(None, MODEL, host_bytes=3 * ENTRY_BYTES, eviction=policy)
        store.put(make_key(0), make_kv(0), recompute_cost_s=10.0)  # costly, used once
        store.put(make_key(1), make_kv(1), recompute_cost_s=0.01)  # cheap, used often
        store.put(make_key(2), make_kv(2), recompute_cost_s=1.0)
        for _ in range(5):
            store.get(make_key(1))
        store.put(make_key(3), make_kv(3), recompute_cost_s=1.0)
        return {n for n in range(4) if store.get(make_key(n)) is not None}

    assert run("lru") == {1, 2, 3}  # the least recently used (costly) entry left
    assert run("value") == {0, 2, 3}  # 0.01 s x 6 uses saves least per byte


def test_value_policy_without_costs_falls_back_to_frequency():
    store = KVStore(None, MODEL, host_bytes=2 * ENTRY_BYTES, eviction="value")
    store.put(make_key(0), make_kv(0))
    store.put(make_key(1), make_kv(1))
    store.get(make_key(0))
    store.get(make_key(1))
    store.get(make_key(0))
    store.put(make_key(2), make_kv(2))
    assert store.get(make_key(0)) is not None and store.get(make_key(1)) is None


def test_unknown_eviction_policy_is_a_config_error():
    from ragkit.errors import ConfigError

    with pytest.raises(ConfigError, match="cache.eviction"):
        KVStore(None, MODEL, eviction="fifo")


def test_a_hit_in_a_lower_memory_tier_moves_to_the_first_and_overflow_moves_down():
    store = KVStore(None, MODEL, host_bytes=10 * ENTRY_BYTES)
    # The device tier is skipped on CPU; give the store a second CPU tier to exercise the same path.
    store._memory.insert(0, MemoryTier("device", torch.device("cpu"), 2 * ENTRY_BYTES, store.policy))
    for n in range(3):
        store.put(make_key(n), make_kv(n))
    tiers = {t.name: set(t.entries) for t in store._memory}
    assert tiers["device"] == {make_key(1).digest(), make_key(2).digest()}
    assert tiers["host"] == {make_key(0).digest()}
    assert same(store.get(make_key(0)), make_kv(0))
    tiers = {t.name: set(t.entries) for t in store._memory}
    assert tiers["device"] == {make_key(2).digest(), make_key(0).digest()}
    assert tiers["host"] == {make_key(1).digest()}
    stats = store.stats()["tiers"]
    assert (stats["device"]["misses"], stats["host"]["hits"], stats["device"]["evictions"]) == (1, 1, 2)


def test_entry_larger_than_a_tier_skips_it():
    store = KVStore(None, MODEL, host_bytes=ENTRY_BYTES - 1)
    store.put(make_key(0), make_kv(0))
    assert store.get(make_key(0)) is None


def test_disk_budget_evicts_files_least_recently_used_first(tmp_path):
    root = tmp_path / "kv"
    file_bytes = len(entry_path_bytes(tmp_path))
    store = KVStore(root, MODEL, host_bytes=0, disk_bytes=3 * file_bytes + 10)
    for n in range(3):
        store.put(make_key(n), make_kv(n))
    assert store.get(make_key(0)) is not None  # 0 is now more recent than 1
    store.put(make_key(3), make_kv(3))
    on_disk = {n for n in range(4) if entry_path(root, make_key(n)).exists()}
    assert on_disk == {0, 2, 3}
    disk = store.stats()["tiers"]["disk"]
    assert disk["evictions"] == 1 and disk["bytes"] <= disk["budget"]
    big = KVStore(root, MODEL, host_bytes=0, disk_bytes=10)
    big.put(make_key(9), make_kv(9, tokens=64))
    assert not entry_path(root, make_key(9)).exists()


def test_disk_tier_matches_a_reference_lru_under_random_traffic(tmp_path):
    capacity = 4
    file_bytes = len(entry_path_bytes(tmp_path))
    store = KVStore(tmp_path / "kv", MODEL, host_bytes=0, disk_bytes=capacity * file_bytes)  # every get reads disk
    for reference in lru_traffic(store, seed=1, steps=150, keys=9, capacity=capacity, put_share=0.4):
        on_disk = {m for m in range(9) if entry_path(tmp_path / "kv", make_key(m)).exists()}
        assert on_disk == reference


def entry_path_bytes(tmp_path: Path) -> bytes:
    """The bytes of one make_kv entry file, to size budgets in files."""
    root = tmp_path / "probe"
    KVStore(root, MODEL).put(make_key(0), make_kv(0))
    return entry_path(root, make_key(0)).read_bytes()


def test_host_eviction_demotes_to_disk_an_entry_the_disk_lost(tmp_path):
    root = tmp_path / "kv"
    store = KVStore(root, MODEL, host_bytes=2 * ENTRY_BYTES)
    store.put(make_key(0), make_kv(0))
    KVStore(root, MODEL).clear()  # another process empties the folder; 0 survives in our host tier
    assert not entry_path(root, make_key(0)).exists()
    store.put(make_key(1), make_kv(1))
    store.put(make_key(2), make_kv(2))  # host evicts 0: it goes back to disk
    assert same(KVStore(root, MODEL).get(make_key(0)), make_kv(0))


def test_a_failed_disk_write_keeps_the_entry_in_memory(tmp_path, monkeypatch, caplog):
    import errno

    import chunk_cache.disk

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = KVStore(tmp_path / "kv", MODEL)
    monkeypatch.setattr(chunk_cache.disk, "atomic_write_bytes", full_disk)
    store.put(make_key(1), make_kv(1))
    assert same(store.get(make_key(1)), make_kv(1))
    assert "No space left" in caplog.text
    monkeypatch.undo()
    assert KVStore(tmp_path / "kv", MODEL).get(make_key(1)) is None


# -- integrity ------------------------------------------------------------------------------------
def flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["tensor-byte", "metadata", "truncated", "empty"])
def test_a_damaged_entry_is_dropped_then_recomputed(tmp_path, damage, caplog):
    root = tmp_path / "kv"
    KVStore(root, MODEL).put(make_key(1), make_kv(1))
    path = entry_path(root, make_key(1))
    if damage == "tensor-byte":
        flip_byte(path, 5)
    elif damage == "metadata":  # "start": "1" -> "start": "7": the header still parses
        data = path.read_bytes()
        assert data.count(b'"start":"1"') == 1
        path.write_bytes(data.replace(b'"start":"1"', b'"start":"7"'))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-9])
    else:
        path.write_bytes(b"")
    store = KVStore(root, MODEL)
    assert store.get(make_key(1)) is None
    assert not path.exists()
    assert sum(store.stats()["tiers"]["disk"]["dropped"].values()) == 1
    assert "dropping KV cache entry" in caplog.text
    store.put(make_key(1), make_kv(1))  # the caller recomputes
    assert same(KVStore(root, MODEL).get(make_key(1)), make_kv(1))


def test_an_entry_written_by_another_model_is_dropped_then_recomputed(tmp_path):
    root = tmp_path / "kv"
    KVStore(root, MODEL).put(make_key(1), make_kv(1))
    # Another model's writer puts its own tensors (with a valid checksum) at our key's path.
    foreign = DiskTier(tmp_path / "other", 1 << 20, LRUPolicy())
    digest = make_key(1).digest()
    other = make_key(1, model="another-model")
    foreign.write(digest, make_kv(2).tensors(), {"start": "2", "model": other.model, "dtype": other.dtype,
                                                 "prefix_hash": other.context_hash, "chunk_hash": other.chunk_hash}, 0.0)
    os.replace(foreign.path(digest), entry_path(root, make_key(1)))
    store = KVStore(root, MODEL)
    assert store.get(make_key(1)) is None
    assert store.stats()["tiers"]["disk"]["dropped"] == {"model": 1}
    store.put(make_key(1), make_kv(1))
    assert same(KVStore(root, MODEL).get(make_key(1)), make_kv(1))


def test_an_entry_filed_under_another_key_is_dropped(tmp_path):
    root = tmp_path / "kv"
    store = KVStore(root, MODEL)
    store.put(make_key(1), make_kv(1))
    store.put(make_key(2), make_kv(2))
    os.replace(entry_path(root, make_key(2)), entry_path(root, make_key(1)))
    fresh = KVStore(root, MODEL)
    assert fresh.get(make_key(1)) is None
    assert fresh.stats()["tiers"]["disk"]["dropped"] == {"key": 1}


def test_contains_means_get_would_succeed(tmp_path):
    root = tmp_path / "kv"
    KVStore(root, MODEL).put(make_key(1), make_kv(1))
    KVStore(root, MODEL).put(make_key(2), make_kv(2))
    assert make_key(1) in KVStore(root, MODEL)
    flip_byte(entry_path(root, make_key(1)), 3)  # warming skips what is `in` the store: it must be valid
    store = KVStore(root, MODEL)
    assert make_key(1) not in store and make_key(2) in store
    assert not entry_path(root, make_key(1)).exists()
    assert store.stats()["hits"] == 0  # a membership test is not a use
    assert "abc" not in store


# -- the folder: manifest, journal, reconciliation -------------------------------------------------
def test_one_folder_holds_several_models_and_dtypes_side_by_side(tmp_path):
    root = tmp_path / "kv"
    KVStore(root, "model-a").put(make_key(1, model="model-a"), make_kv(1))
    KVStore(root, "model-a").put(make_key(1, model="model-a", dtype="bfloat16"), make_kv(1, dtype=torch.bfloat16))
    b = KVStore(root, "model-b")  # no refusal: entries carry their model
    assert b.get(make_key(1, model="model-b")) is None  # never model-a's entry for the same chunk
    assert b.variants("float32", make_key(1).chunk_hash) == []
    b.put(make_key(1, model="model-b"), make_kv(5))
    assert same(KVStore(root, "model-a").get(make_key(1, model="model-a")), make_kv(1))
    assert same(KVStore(root, "model-b").get(make_key(1, model="model-b")), make_kv(5))
    assert [k.model for k in KVStore(root, "model-a").variants("float32", make_key(1).chunk_hash)] == ["model-a"]
    models = cache_stats(root)["models"]
    assert {m: (v["entries"], v["dtypes"]) for m, v in models.items()} == {
        "model-a": (2, ["bfloat16", "float32"]), "model-b": (1, ["float32"])}
    assert clear_cache(root)["entries"] == 3


def test_clear_reports_what_it_removed_and_spares_foreign_files(tmp_path):
    root = tmp_path / "kv"
    store = KVStore(root, MODEL)
    for n in range(3):
        store.put(make_key(n), make_kv(n))
    size = sum(entry_path(root, make_key(n)).stat().st_size for n in range(3))
    (root / "notes.txt").write_text("mine")
    assert clear_cache(root) == {"dir": str(root), "entries": 3, "bytes": size}
    assert (root / "notes.txt").read_text() == "mine" and not (root / ENTRIES).exists()
    assert clear_cache(root) is None
    assert clear_cache(tmp_path / "missing") is None


def test_bad_manifests_and_foreign_folders_are_refused(tmp_path):
    root = tmp_path / "kv"
    KVStore(root, MODEL)
    manifest = json.loads((root / MANIFEST).read_text())
    (root / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(IndexMismatchError, match="version 99"):
        KVStore(root, MODEL)
    (root / MANIFEST).write_text("{not json")
    with pytest.raises(IndexMismatchError, match="unreadable"):
        KVStore(root, MODEL)
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(InputError, match="not a ragkit KV cache"):
        KVStore(foreign, MODEL)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]  # not even a lock file left behind
    with pytest.raises(InputError, match="is a file"):
        KVStore(foreign / "thesis.tex", MODEL)
    (foreign / MANIFEST).write_text(json.dumps({"name": "someone else's"}))
    with pytest.raises(IndexMismatchError, match="not a ragkit KV cache manifest"):
        clear_cache(foreign)
    assert (foreign / "thesis.tex").exists()


def test_hit_counts_and_costs_persist_across_instances(tmp_path):
    root = tmp_path / "kv"
    store = KVStore(root, MODEL)
    store.put(make_key(1), make_kv(1), recompute_cost_s=1.5)
    store.put(make_key(2), make_kv(2))
    for _ in range(3):
        store.get(make_key(1))
    store.flush()
    other = KVStore(root, MODEL)
    other.get(make_key(1))
    del other  # queued hits are written when a store goes away (or the process exits)
    info = cache_stats(root)
    assert info["entries"] == 2 and info["hits"] == 4
    top = info["top"][0]
    assert top["digest"] == make_key(1).digest() and top["hits"] == 4 and top["cost_s"] == 1.5
    assert top["bytes"] == entry_path(root, make_key(1)).stat().st_size and top["age_s"] >= 0


def test_torn_journal_line_and_unlisted_files_are_reconciled(tmp_path):
    root = tmp_path / "kv"
    store = KVStore(root, MODEL)
    store.put(make_key(1), make_kv(1))
    with open(root / JOURNAL, "ab") as fh:
        fh.write(b'{"op":"put","d":"ab')  # a writer died mid-line
    dead_writer_tmp = f".{make_key(1).digest()}.safetensors.tmp-999999999-ab12"  # pid 999999999 is not alive
    entry_path(root, make_key(1)).parent.joinpath(dead_writer_tmp).write_bytes(b"x")
    fresh = KVStore(root, MODEL)
    fresh.put(make_key(2), make_kv(2))
    listed = {e["digest"] for e in KVStore(root, MODEL).stats()["entries"]}
    assert listed == {make_key(1).digest(), make_key(2).digest()}
    assert not list(root.rglob("*.tmp-*"))
    lines = (root / JOURNAL).read_bytes().split(b"\n")
    assert b'{"op":"put","d":"ab' in lines  # the torn line stands alone; every other line parses
    # The journal lost: the files are the truth.
    (root / JOURNAL).unlink()
    assert cache_stats(root)["entries"] == 2
    assert same(KVStore(root, MODEL).get(make_key(2)), make_kv(2))


def test_journal_is_compacted_without_losing_counts(tmp_path):
    root = tmp_path / "kv"
    store = KVStore(root, MODEL)
    store.put(make_key(1), make_kv(1))
    watcher = KVStore(root, MODEL)
    for _ in range(1100):
        store.get(make_key(1))
    store.flush()
    assert len((root / JOURNAL).read_bytes().splitlines()) < 200
    assert cache_stats(root)["hits"] == 1100
    assert {e["hits"] for e in watcher.stats()["entries"] if e["tier"] == "disk"} == {1100}


def test_stats_reports_tiers_rates_and_entries(tmp_path):
    store = KVStore(tmp_path / "kv", MODEL)
    store.put(make_key(1), make_kv(1), recompute_cost_s=0.5)
    store.get(make_key(1))
    store.get(make_key(2))
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (1, 1, 0.5)
    assert stats["tiers"]["host"] == {"entries": 1, "bytes": ENTRY_BYTES, "budget": 2 << 30, "hits": 1,
                                      "misses": 1, "evictions": 0}
    assert stats["tiers"]["disk"]["entries"] == 1 and stats["tiers"]["disk"]["misses"] == 1
    host_row = next(e for e in stats["entries"] if e["tier"] == "host")
    assert host_row["hits"] == 1 and host_row["bytes"] == ENTRY_BYTES and host_row["cost_s"] == 0.5


def test_store_clear_empties_every_tier_and_keeps_working(tmp_path):
    root = tmp_path / "kv"
    store = KVStore(root, MODEL)
    store.put(make_key(1), make_kv(1))
    store.clear()
    assert store.get(make_key(1)) is None and not entry_path(root, make_key(1)).exists()
    store.put(make_key(2), make_kv(2))
    assert same(KVStore(root, MODEL).get(make_key(2)), make_kv(2))


def test_nothing_is_read_through_pickle():
    sources = "".join((Path(__file__).parents[1] / "chunk_cache" / name).read_text()
                      for name in ("store.py", "disk.py", "eviction.py"))
    assert "pickle" not in sources and "torch.load" not in sources and "numpy.load" not in sources
