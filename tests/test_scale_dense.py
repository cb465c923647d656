"""Streaming dense indexing: a resumable embedding store, exact dense shards, on-disk IVF / IVF-PQ.

No model is run: a fake encoder turns texts into seeded clustered vectors."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import retrievers
from ragkit.errors import ConfigError
from retrievers.embedding_store import EmbeddingStore
from retrievers.shards import BuildPlan, ShardedRetriever, build_from_embeddings

ROOT = Path(__file__).resolve().parents[1]
DIM = 32
CENTRES = np.random.default_rng(7).normal(size=(12, DIM)).astype(np.float32)


def fake_encode(texts: list[str]) -> np.ndarray:
    """Deterministic, clustered, normalised vectors: text i lands near centre i % 12."""
    out = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        v = CENTRES[int(text.split()[-1]) % len(CENTRES)] + 0.6 * rng.normal(size=DIM).astype(np.float32)
        out.append(v / np.linalg.norm(v))
    return np.asarray(out, dtype=np.float32)


TEXTS = [f"document number {i}" for i in range(1200)]
IDS = [f"d{i:05d}" for i in range(len(TEXTS))]
QUERIES = fake_encode([f"query {i}" for i in range(25)])


def _store(folder: Path, part_rows: int = 200) -> EmbeddingStore:
    store = EmbeddingStore(folder, "fp")
    store.fill(TEXTS, fake_encode, part_rows)
    return store


def _exact(vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    scores = QUERIES @ vectors.T
    return [[(IDS[i], float(row[i])) for i in np.lexsort((np.array(IDS), -row))[:k]] for row in scores]


def _pairs(results):
    return [[(h.id, h.score) for h in hits] for hits in results]


# -- the embedding store ---------------------------------------------------------------------


def test_store_resumes_after_a_failure_and_matches_one_pass(tmp_path):
    calls = []

    def failing_after_two_parts(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise RuntimeError("encoder died")
        return fake_encode(batch)

    store = EmbeddingStore(tmp_path / "store", "fp")
    with pytest.raises(RuntimeError):
        store.fill(TEXTS, failing_after_two_parts, 250)
    resumed = EmbeddingStore(tmp_path / "store", "fp")
    assert resumed.count == 500
    calls.clear()
    assert resumed.fill(TEXTS, lambda b: calls.append(len(b)) or fake_encode(b), 250) == 700
    assert sum(calls) == 700  # only the rows no finished part held
    np.testing.assert_array_equal(resumed.rows(0, len(TEXTS)), fake_encode(TEXTS))
    np.testing.assert_array_equal(resumed.take(np.array([1199, 3, 600])), fake_encode(TEXTS)[[1199, 3, 600]])
    assert EmbeddingStore(tmp_path / "store", "other texts").count == 0  # another fingerprint starts over


def test_store_killed_mid_build_restarts_from_the_last_finished_part(tmp_path):
    """SIGKILL a child process embedding slowly; the store it leaves resumes to the exact result."""
    folder = tmp_path / "store"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_scale_dense import TEXTS, fake_encode
        from retrievers.embedding_store import EmbeddingStore
        def slow(batch):
            time.sleep(0.05)
            return fake_encode(batch)
        EmbeddingStore({str(folder)!r}, "fp").fill(TEXTS, slow, 40)
    """)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while EmbeddingStore(folder, "fp").count < 200:
        assert time.monotonic() < deadline and child.poll() is None, "the child never wrote 5 parts"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    store = EmbeddingStore(folder, "fp")
    assert 200 <= store.count < len(TEXTS)
    assert store.count % 40 == 0
    store.fill(TEXTS, fake_encode, 40)
    np.testing.assert_array_equal(store.rows(0, len(TEXTS)), fake_encode(TEXTS))


# -- shards over the store ---------------------------------------------------------------------


def _sharded(spec, store, folder: Path, shards: int, memory_budget: int = 64 << 20) -> ShardedRetriever:
    folder.mkdir()
    build_from_embeddings(spec, 0, IDS, folder, BuildPlan(shards=shards, memory_budget=memory_budget), store)
    return ShardedRetriever(spec, 0, folder)


def test_exact_dense_shards_equal_one_index(tmp_path):
    store = _store(tmp_path / "store")
    whole = retrievers.build({"type": "dense"})
    whole.add_vectors(IDS, store.rows(0, len(IDS)))
    expected = whole.search_vectors(QUERIES, 20)
    for shards in (1, 3):
        sharded = _sharded({"type": "dense"}, store, tmp_path / f"s{shards}", shards)
        got = sharded.search_vectors(QUERIES, 20)
        assert [[h.id for h in hits] for hits in got] == [[h.id for h in hits] for hits in expected]
        np.testing.assert_allclose([h.score for q in got for h in q], [h.score for q in expected for h in q],
                                   rtol=1e-6)


@pytest.mark.parametrize("shards", [1, 3])
def test_ivf_probing_every_list_equals_exact_search(tmp_path, shards):
    """With nprobe = nlist the on-disk lists hold every row, and re-scoring makes the scores exact."""
    store = _store(tmp_path / "store", part_rows=170)  # parts that straddle shard boundaries
    spec = {"type": "ivf", "nlist": 8, "nprobe": 8}
    sharded = _sharded(spec, store, tmp_path / "ivf", shards, memory_budget=4 << 20)
    assert len(sharded) == len(IDS)
    expected = _exact(store.rows(0, len(IDS)), 10)
    got = _pairs(sharded.search_vectors(QUERIES, 10))
    assert [[i for i, _ in q] for q in got] == [[i for i, _ in q] for q in expected]
    np.testing.assert_allclose([s for q in got for _, s in q], [s for q in expected for _, s in q], rtol=1e-6)
    shard = tmp_path / "ivf" / "shard-00000"
    assert (shard / "lists.ivfdata").stat().st_size > 0 and not list(shard.glob(".block-*"))


def test_ivfpq_on_disk_recall_and_moved_folder(tmp_path):
    store = _store(tmp_path / "store")
    spec = {"type": "ivfpq", "nlist": 12, "nprobe": 4, "m": 8, "nbits": 6, "rerank": 4}
    _sharded(spec, store, tmp_path / "pq", shards=2)
    shutil.move(tmp_path / "pq", tmp_path / "moved")  # lists are found beside index.faiss, wherever it is
    sharded = ShardedRetriever(spec, 0, tmp_path / "moved")
    expected = _exact(store.rows(0, len(IDS)), 10)
    got = _pairs(sharded.search_vectors(QUERIES, 10))
    recall = np.mean([len({i for i, _ in a} & {i for i, _ in b}) / 10 for a, b in zip(got, expected)])
    assert recall >= 0.9
    for q, row in zip(got, QUERIES @ store.rows(0, len(IDS)).T):  # scores are exact inner products
        for cid, score in q:
            assert score == pytest.approx(float(row[IDS.index(cid)]), rel=1e-5)
    with pytest.raises(ValueError, match="filters are not supported"):
        sharded.search_vectors(QUERIES, 10, filter={"year": 2000})


def test_too_many_lists_is_a_config_error(tmp_path):
    store = EmbeddingStore(tmp_path / "store", "fp")
    store.fill(TEXTS[:20], fake_encode, 10)
    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigError, match=r"retrieval.retrievers\[0\].nlist"):
        build_from_embeddings({"type": "ivf", "nlist": 64}, 0, IDS[:20], tmp_path / "x", BuildPlan(), store)
