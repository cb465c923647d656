"""Sharded BM25 with whole-corpus statistics ranks and scores exactly as one BM25 index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import retrievers
from ragkit.errors import ConfigError, IndexMismatchError
from retrievers.base import indexed_text
from ragkit.config import parse_bytes
from retrievers.shards import BuildPlan, ShardedRetriever, build, split
from retrievers.sparse import CorpusStats
from tests.test_retrievers import make_chunk, scifact_slice  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def corpus(scifact_slice):
    """400 SciFact abstracts plus duplicates (exact score ties across shards) and 40 queries."""
    chunks, queries = scifact_slice
    duplicates = [make_chunk(f"dup{i}", chunks[i * 37].text, chunks[i * 37].title, year=2000) for i in range(8)]
    return chunks + duplicates, queries


def _sharded(spec, chunks, folder: Path, **plan) -> ShardedRetriever:
    folder.mkdir()
    build(spec, 0, chunks, folder, BuildPlan(**plan))
    return ShardedRetriever(spec, 0, folder)


def _as_tuples(results):
    return [[(h.id, h.score, h.rank) for h in hits] for hits in results]


def test_merged_statistics_equal_one_pass_over_the_corpus(corpus):
    chunks, _ = corpus
    whole = retrievers.build({"type": "bm25"})
    whole.index(chunks)
    parts = [whole.gather_stats(indexed_text(c) for c in chunks[a:b]) for a, b in split(len(chunks), 4)]
    merged = CorpusStats.merge(parts)
    assert merged.vocab == whole.tokenizer.vocab  # same term ids, in first-seen order
    np.testing.assert_array_equal(merged.doc_freq, whole.matrix.doc_freq)
    assert (merged.n_docs, merged.avgdl) == (whole.matrix.n_docs, whole.matrix.avgdl)


@pytest.mark.parametrize("spec", [{"type": "bm25"}, {"type": "bm25", "idf": "robertson", "query_side": True}])
def test_sharded_bm25_ranks_and_scores_exactly_as_one_index(corpus, tmp_path, spec):
    chunks, queries = corpus
    whole = retrievers.build(spec)
    whole.index(chunks)
    for k in (10, 1000):
        expected = _as_tuples(whole.search(queries, k))
        for shards in (1, 2, 3, 7):
            sharded = _sharded(spec, chunks, tmp_path / f"s{shards}-k{k}", shards=shards)
            assert len(sharded.manifest["shards"]) == shards and len(sharded) == len(chunks)
            assert _as_tuples(sharded.search(queries, k)) == expected, (shards, k)
    filtered = whole.search(queries, 20, filter={"year": 2001})
    assert _as_tuples(sharded.search(queries, 20, filter={"year": 2001})) == _as_tuples(filtered)


def test_memory_budget_adds_shards_and_keeps_rankings(corpus, tmp_path):
    chunks, queries = corpus
    whole = retrievers.build({"type": "bm25"})
    whole.index(chunks)
    sharded = _sharded({"type": "bm25"}, chunks, tmp_path / "tight", shards=2, memory_budget=2 << 20)
    assert len(sharded.manifest["shards"]) > 2  # 2 MiB cannot hold half of this corpus's postings
    assert _as_tuples(sharded.search(queries, 50)) == _as_tuples(whole.search(queries, 50))


def test_a_shard_refuses_terms_outside_the_statistics_and_deletes(corpus):
    from retrievers.bm25 import BM25Retriever

    chunks, _ = corpus
    probe = retrievers.build({"type": "bm25"})
    stats = probe.gather_stats(indexed_text(c) for c in chunks[:10])
    shard = BM25Retriever(probe.params, corpus=stats)
    with pytest.raises(ValueError, match="outside the corpus statistics"):
        shard.index(chunks[10:20])
    shard.index(chunks[:5])
    with pytest.raises(ValueError, match="cannot delete"):
        shard.delete([chunks[0].id])


def test_sharded_folder_checked_on_load(corpus, tmp_path):
    chunks, _ = corpus
    _sharded({"type": "bm25"}, chunks[:40], tmp_path / "idx", shards=2)
    with pytest.raises(IndexMismatchError, match="sharded 'bm25' index"):
        ShardedRetriever({"type": "dense"}, 0, tmp_path / "idx")
    with pytest.raises(IndexMismatchError, match="unreadable"):
        ShardedRetriever({"type": "bm25"}, 0, tmp_path / "nothing")


@pytest.mark.parametrize("text,expected", [("4GiB", 4 << 30), ("512 MB", 512 * 10**6), ("1.5gib", 3 << 29),
                                           ("2000000", 2_000_000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text, "index.memory_budget") == expected


@pytest.mark.parametrize("text", ["4 potatoes", "", "-1GiB", "12KiB"])
def test_parse_bytes_names_the_key(text):
    with pytest.raises(ConfigError, match="index.memory_budget"):
        parse_bytes(text, "index.memory_budget")


def test_encode_many_gives_the_ids_and_vocabulary_of_encode_per_text(corpus):
    from retrievers.tokenize import Tokenizer

    texts = [indexed_text(c) for c in corpus[0]] + ["", "the and of", "Über naïve café ALPHA-beta"]
    one_by_one, batched = Tokenizer(), Tokenizer()
    expected = [one_by_one.encode(text, grow=True) for text in texts]
    ids, counts = batched.encode_many(texts, grow=True)
    assert list(batched.vocab.items()) == list(one_by_one.vocab.items())  # same ids, same first-seen order
    assert ids.tolist() == [t for terms in expected for t in terms]
    assert counts.tolist() == [len(terms) for terms in expected]
    queries = ["unseenword cells the protein", "zzzz"]
    ids, counts = batched.encode_many(queries, grow=False)
    assert ids.tolist() == [t for q in queries for t in one_by_one.encode(q, grow=False)]
    assert counts.tolist() == [len(one_by_one.encode(q, grow=False)) for q in queries]
    assert list(batched.vocab) == list(one_by_one.vocab)  # grow=False added nothing
