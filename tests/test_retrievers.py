"""Retrievers: BM25 against bm25s and rank-bm25, incremental updates against fresh builds,
filters, persistence, deterministic ties, spec validation. No model is loaded here (dense
retrievers get precomputed clustered vectors); see test_retrievers_dense.py for the encoder."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import retrievers
from ragkit.errors import ConfigError, IndexMismatchError
from ragkit.types import Chunk
from retrievers.tokenize import Tokenizer

DATA = Path(__file__).resolve().parent.parent / "data" / "scifact"


def make_chunk(cid: str, text: str, title: str = "", **metadata) -> Chunk:
    return Chunk(id=cid, doc_id=cid, text=text, token_ids=(), span=(0, len(text)), content_hash="", title=title,
                 metadata=metadata)


@pytest.fixture(scope="module")
def scifact_slice():
    """400 SciFact abstracts (with titles and a synthetic `year` field) and 40 test queries."""
    chunks = []
    with gzip.open(DATA / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        for i, line in zip(range(400), fh):
            doc = json.loads(line)
            chunks.append(make_chunk(doc["_id"], doc["text"], doc.get("title", ""), year=2000 + i % 4))
    queries = [json.loads(line)["text"] for line in (DATA / "queries.jsonl").read_text().splitlines()[:40]]
    return chunks, queries


def ids_of(results):
    return [[hit.id for hit in hits] for hits in results]


# -- BM25 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("idf", ["lucene", "robertson"])
@pytest.mark.parametrize("query_side", [False, True])
def test_bm25s_backend_ranks_like_rank_bm25_reference(scifact_slice, idf, query_side):
    chunks, queries = scifact_slice
    results = {}
    for backend in ("bm25s", "rank_bm25"):
        r = retrievers.build({"type": "bm25", "backend": backend, "idf": idf, "query_side": query_side})
        r.index(chunks)
        results[backend] = r.search(queries, 20)
    assert ids_of(results["bm25s"]) == ids_of(results["rank_bm25"])
    fast = np.array([h.score for hits in results["bm25s"] for h in hits])
    ref = np.array([h.score for hits in results["rank_bm25"] for h in hits])
    np.testing.assert_allclose(fast, ref, rtol=1e-5)


def test_bm25_matches_raw_bm25s_and_bm25s_reads_saved_index(scifact_slice, tmp_path):
    import bm25s
    import Stemmer

    chunks, queries = scifact_slice
    ours = retrievers.build({"type": "bm25"})
    ours.index(chunks)
    texts = [f"{c.title}\n{c.text}" for c in chunks]
    stemmer = Stemmer.Stemmer("english")
    raw = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    raw.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    query_tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, show_progress=False, return_ids=False)
    docs, scores = raw.retrieve(query_tokens, k=10, show_progress=False)
    ours_hits = ours.search(queries, 10)
    for q, hits in enumerate(ours_hits):
        expected = {chunks[d].id: float(s) for d, s in zip(docs[q], scores[q]) if s > 0}
        got = {h.id: h.score for h in hits}
        assert got.keys() == expected.keys()
        np.testing.assert_allclose([got[i] for i in expected], list(expected.values()), rtol=1e-5)

    ours.save(tmp_path)
    reloaded = bm25s.BM25.load(tmp_path)
    tokens = [Tokenizer().terms(q) for q in queries]
    docs2, _ = reloaded.retrieve([[t for t in q if t in reloaded.vocab_dict] or [q[0]] for q in tokens], k=5,
                                 show_progress=False)
    assert [[chunks[d].id for d in row] for row in docs2[:5]] == ids_of(ours.search(queries[:5], 5))


def test_query_side_bm25_matches_brights_formula():
    """Independent dict-based implementation of gensim's LuceneBM25Model as BRIGHT uses it."""
    texts = {"a": "red apple red fruit", "b": "green apple pie", "c": "red car fast car car", "d": "fruit salad"}
    r = retrievers.build({"type": "bm25", "query_side": True, "stemmer": "none", "stopwords": "none"})
    r.index(make_chunk(cid, text) for cid, text in texts.items())
    k1, b = 0.9, 0.4
    bags = {cid: Counter(t.split()) for cid, t in texts.items()}
    avgdl = sum(sum(bag.values()) for bag in bags.values()) / len(bags)
    df = Counter(term for bag in bags.values() for term in bag)

    def weights(bag):
        length = sum(bag.values())
        return {t: (math.log(len(bags) + 1) - math.log(df[t] + 0.5)) * f / (f + k1 * (1 - b + b * length / avgdl))
                for t, f in bag.items()}

    query = Counter({t: f for t, f in Counter("red red apple unknownword".split()).items() if t in df})
    qw = weights(query)
    expected = {cid: sum(qw[t] * weights(bag).get(t, 0.0) for t in qw) for cid, bag in bags.items()}
    hits = r.search(["red red apple unknownword"], 4)[0]
    assert [h.id for h in hits] == sorted((c for c in expected if expected[c] > 0), key=lambda c: -expected[c])
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.id], rel=1e-5)


def test_bm25_add_and_delete_equal_a_fresh_build(scifact_slice, tmp_path):
    chunks, queries = scifact_slice
    incremental = retrievers.build({"type": "bm25"})
    incremental.index(chunks[:250])
    incremental.add(chunks[250:])
    gone = [c.id for c in chunks[::7]]
    assert incremental.delete(gone + ["no-such-id"]) == len(gone)
    changed = make_chunk(chunks[1].id, "myocardial infarction in mice treated with statins", year=1999)
    incremental.add([changed])
    final = [changed] + [c for c in chunks[2:] if c.id not in set(gone)]
    fresh = retrievers.build({"type": "bm25"})
    fresh.index(final)
    for query_side in (False, True):
        incremental.params.query_side = fresh.params.query_side = query_side
        got, want = incremental.search(queries, 30), fresh.search(queries, 30)
        assert got == want  # ids, ranks and scores
    fresh.params.query_side = False
    assert len(incremental) == len(final)
    incremental.save(tmp_path)
    loaded = retrievers.build({"type": "bm25"})
    loaded.load(tmp_path)
    assert loaded.search(queries, 30) == fresh.search(queries, 30)
    loaded.add([make_chunk("new", "statins and myocardial infarction")])  # a memory-mapped index can grow
    assert loaded.search(["statins infarction"], 1)[0][0].id == "new"


def test_bm25_ties_broken_by_id_and_empty_query():
    r = retrievers.build({"type": "bm25"})
    r.index([make_chunk(cid, "identical text about proteins") for cid in ["d3", "d1", "d2"]]
            + [make_chunk("x", "unrelated words")])
    hits = r.search(["proteins"], 2)[0]
    assert [h.id for h in hits] == ["d1", "d2"] and hits[0].score == hits[1].score
    assert r.search(["zzzz qqqq", ""], 5) == [[], []]


def test_bm25_filters_return_k_hits_when_k_matching_exist(scifact_slice):
    chunks, queries = scifact_slice
    r = retrievers.build({"type": "bm25"})
    r.index(chunks)
    unfiltered = r.search(queries, 400)
    for flt, allowed in (({"year": 2001}, {2001}), ({"year": [2000, 2003]}, {2000, 2003})):
        results = r.search(queries, 10, filter=flt)
        for hits, everything in zip(results, unfiltered):
            matching = [h.id for h in everything if r.metadata.columns["year"][r.slot_of[h.id]] in allowed]
            assert [h.id for h in hits] == matching[:10]
    assert r.search(queries[:1], 10, filter={"year": 1850}) == [[]]
    with pytest.raises(ConfigError, match="filter.author.*unknown metadata field.*year"):
        r.search(queries[:1], 10, filter={"author": "x"})


def test_bm25_save_load_same_rankings_and_mismatches(scifact_slice, tmp_path):
    chunks, queries = scifact_slice
    r = retrievers.build({"type": "bm25"})
    r.index(chunks)
    r.save(tmp_path)
    for mmap in (True, False):
        loaded = retrievers.build({"type": "bm25", "mmap": mmap})
        loaded.load(tmp_path)
        assert loaded.search(queries, 50, filter={"year": 2002}) == r.search(queries, 50, filter={"year": 2002})
    with pytest.raises(IndexMismatchError, match="k1=0.9.*1.2"):
        retrievers.build({"type": "bm25", "k1": 1.2}).load(tmp_path)
    with pytest.raises(IndexMismatchError, match="'bm25' index.*'dense'"):
        retrievers.build({"type": "dense"}).load(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexMismatchError, match="format version 99"):
        retrievers.build({"type": "bm25"}).load(tmp_path)
    with pytest.raises(IndexMismatchError, match="no manifest.json"):
        retrievers.build({"type": "bm25"}).load(tmp_path / "missing")


# -- dense over precomputed vectors -------------------------------------------------------------

def clustered(n: int, dim: int = 32, centres: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(centres, dim))
    points = centre[rng.integers(0, centres, n)] + 0.4 * rng.normal(size=(n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


DENSE_SPECS = [{"type": "dense"}, {"type": "hnsw", "ef_search": 400}, {"type": "ivf", "nlist": 4, "nprobe": 4},
               {"type": "ivfpq", "nlist": 4, "nprobe": 4, "m": 16, "nbits": 4, "train_size": 400}]


@pytest.mark.parametrize("spec", DENSE_SPECS, ids=lambda s: s["type"])
def test_dense_add_delete_filter_save_load(spec, tmp_path):
    vectors = clustered(400)
    ids = [f"c{i:03d}" for i in range(400)]
    meta = [{"lang": ["en", "de", "fr", "es"][i % 4], "shard": i % 50} for i in range(400)]
    queries = clustered(12, seed=1)
    exact = vectors @ queries.T

    r = retrievers.build(spec)
    r.add_vectors(ids[:300], vectors[:300], meta[:300])
    r.add_vectors(ids[300:], vectors[300:], meta[300:])
    hits = r.search_vectors(queries, 10)
    truth = [[ids[i] for i in np.lexsort((np.arange(400), -exact[:, q]))[:10]] for q in range(12)]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids_of(hits), truth)])
    assert recall >= (0.5 if spec["type"] == "ivfpq" else 1.0)  # PQ codes are lossy

    # Filters: 25% of slots (oversampled ANN search) and 2% of slots (exact over the subset).
    for flt, allowed in (({"lang": "de"}, {i for i in range(400) if i % 4 == 1}),
                         ({"shard": [3, 7]}, {i for i in range(400) if i % 50 in (3, 7)})):
        for q, hits in enumerate(r.search_vectors(queries, 10, filter=flt)):
            assert len(hits) == min(10, len(allowed)) and all(int(h.id[1:]) in allowed for h in hits)
            if spec["type"] != "ivfpq" or len(allowed) < 20:
                best = sorted(allowed, key=lambda i: (-exact[i, q], i))[:10]
                assert [h.id for h in hits] == [ids[i] for i in best]

    # Deleting half the chunks (tombstones, then a rebuild) equals a fresh build on the rest.
    dead = set(ids[::2])
    assert r.delete(dead) == 200
    r.save(tmp_path)
    loaded = retrievers.build(spec)
    loaded.load(tmp_path)
    rest = [i for i in range(400) if ids[i] not in dead]
    fresh = retrievers.build(spec)
    fresh.add_vectors([ids[i] for i in rest], vectors[rest], [meta[i] for i in rest])
    if spec["type"] != "ivfpq":
        assert ids_of(loaded.search_vectors(queries, 10)) == ids_of(fresh.search_vectors(queries, 10))
    assert loaded.search_vectors(queries, 10) == r.search_vectors(queries, 10)
    assert all(h.id not in dead for hits in loaded.search_vectors(queries, 50) for h in hits)


def test_dense_ties_broken_by_id():
    r = retrievers.build({"type": "dense"})
    v = clustered(30)
    r.add_vectors([f"z{i}" for i in range(30)] + ["b", "a", "c"], np.concatenate([v, v[[0, 0, 0]]]))
    hits = r.search_vectors(v[[0]], 3)[0]
    assert [h.id for h in hits] == ["a", "b", "c"]


# -- fusion and specs ---------------------------------------------------------------------------

def test_rrf_and_weighted_fusion_by_hand():
    from ragkit.types import Hit

    bm25 = [[Hit("a", 9.0, 1), Hit("b", 5.0, 2), Hit("c", 1.0, 3)]]
    dense = [[Hit("c", 0.9, 1), Hit("a", 0.8, 2), Hit("d", 0.7, 3)]]
    fused = retrievers.fuse([bm25, dense], "rrf", k=4)[0]
    assert [h.id for h in fused] == ["a", "c", "b", "d"]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62)
    tie = retrievers.fuse([[[Hit("y", 1.0, 1)]], [[Hit("x", 1.0, 1)]]], "rrf", k=2)[0]
    assert [h.id for h in tie] == ["x", "y"]
    minmax = retrievers.fuse([bm25, dense], "weighted", k=4, weights=[1.0, 2.0])[0]
    # a: 1 + 2*0.5 = 2.0; c: 0 + 2*1 = 2.0; b: 0.5 + 0 = 0.5; d: 0 + 0 = 0
    assert [(h.id, round(h.score, 6)) for h in minmax] == [("a", 2.0), ("c", 2.0), ("b", 0.5), ("d", 0.0)]
    z = retrievers.fuse([bm25, dense], "weighted", k=4, normalization="zscore")[0]
    za = (9 - 5) / np.std([9, 5, 1]) + 0.0
    assert dict((h.id, h.score) for h in z)["a"] == pytest.approx(za)
    with pytest.raises(ConfigError, match="retrieval.fusion.*'max'.*rrf, weighted"):
        retrievers.fuse([bm25], "max", k=3)


@pytest.mark.parametrize("spec, message", [
    ({"type": "splade"}, r"retrieval.retrievers\[2\].type.*unknown retriever 'splade'.*bm25, dense, hnsw"),
    ({"type": "bm25", "k3": 1}, r"retrievers\[2\].k3.*unknown parameter.*k1"),
    ({"type": "bm25", "backend": "lucene"}, r"retrievers\[2\].backend.*'lucene'.*bm25s, rank_bm25"),
    ({"type": "bm25", "b": 1.5}, r"retrievers\[2\].b.*\[0, 1\]"),
    ({"type": "hnsw", "M": "many"}, r"retrievers\[2\].M.*expected int"),
    ({"type": "dense", "model": "/no/such/model"}, r"retrievers\[2\].model.*local sentence-transformers folder"),
])
def test_build_rejects_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        retrievers.build(spec, 2)


def test_ivfpq_rerank_recovers_recall_of_exact_search():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(200, 64)).astype(np.float32)
    vectors = centers[rng.integers(0, 200, 5000)] + rng.normal(size=(5000, 64)).astype(np.float32) * 0.3
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:50] + rng.normal(size=(50, 64)).astype(np.float32) * 0.05
    ids = [f"c{i}" for i in range(len(vectors))]
    exact = retrievers.build({"type": "dense"})
    exact.add_vectors(ids, vectors)
    truth = [{h.id for h in hits} for hits in exact.search_vectors(queries, 10)]

    def recall(rerank):
        r = retrievers.build({"type": "ivfpq", "nlist": 32, "nprobe": 8, "m": 16, "rerank": rerank})
        r.add_vectors(ids, vectors)
        found = r.search_vectors(queries, 10)
        scores_exact = all(h.score == pytest.approx(float(vectors[int(h.id[1:])] @ queries[i]), abs=1e-5)
                           for i, hits in enumerate(found) for h in hits)
        return np.mean([len(truth[i] & {h.id for h in hits}) / 10 for i, hits in enumerate(found)]), scores_exact

    plain, _ = recall(1)
    reranked, exact_scores = recall(4)
    assert reranked >= 0.95 and reranked > plain
    assert exact_scores
