"""Primed entries (chunk_cache.primer): which passage primes, what a primed warm stores, which variant a
prompt reuses, and that a cache warmed without a primer is still read."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chunk_cache.primer import choose_primers
from ragkit.config import CacheConfig, GeneratorConfig
from ragkit.types import Chunk, token_hash
from tests.conftest import text_chunks, tiny_llama

torch.set_num_threads(1)
QUESTION = "Where is Exeter College?"
TEXTS = ["Exeter College is in Oxford, on Turl Street.", "The Thames flows through Oxford and London.",
         "Rivers carry boats past colleges and bridges.", "A short one."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("primer") / "model", layers=2, init_range=0.2)


def _rag(folder):
    from generators.rag import RagGenerator

    generator = {**dataclasses.asdict(GeneratorConfig()), "model": str(folder), "max_new_tokens": 3}
    return RagGenerator(generator, {**dataclasses.asdict(CacheConfig()), "dir": ""})


def _chunks(rag):
    return text_chunks(rag, TEXTS)


def _chunk(cid: str, length: int) -> Chunk:
    ids = list(range(1, length + 1))
    return Chunk(id=cid, doc_id=cid, text="x", token_ids=ids, span=(0, 0), content_hash=token_hash(ids))


def _ids(chunks):
    return [c.id for c in chunks]


def test_primers_are_the_chunks_nearest_the_median_length_ties_by_id():
    assert choose_primers([], 1) == [] and choose_primers([_chunk("a", 9)], 0) == []
    assert _ids(choose_primers([_chunk("a", 9)], 3)) == ["a"]
    chunks = [_chunk("e", 50), _chunk("b", 7), _chunk("d", 20), _chunk("c", 20), _chunk("a", 3)]
    assert _ids(choose_primers(chunks, 1)) == ["c"]  # lengths 3 7 20 20 50: the median length, the smaller id
    assert _ids(choose_primers(chunks[::-1], 1)) == ["c"]  # independent of order
    assert _ids(choose_primers([chunks[0], chunks[1], chunks[2], chunks[4]], 1)) == ["b"]  # 3 7 20 50: lower median
    assert _ids(choose_primers(chunks, 2)) == ["c", "d"] and _ids(choose_primers(chunks, 3)) == ["b", "c", "d"]


def _variants(rag, chunk):
    return rag.store.variants(rag.keys.dtype, rag.keys.shared(chunk.token_ids).chunk_hash)


def test_a_primed_warm_stores_each_chunk_behind_the_head_and_behind_the_primer_once(folder):
    rag = _rag(folder)
    chunks = _chunks(rag)
    primer, others = chunks[0], chunks[1:]
    assert rag.warm(chunks, progress=False, primers=[primer]) == len(chunks)
    assert rag.warm(chunks, progress=False, primers=[primer]) == 0  # idempotent
    for chunk in others:
        keys = _variants(rag, chunk)
        assert rag.keys.shared(chunk.token_ids) in keys and len(keys) == 2
        segments = rag.primed_segments(chunk, [primer])  # head, title, primer, gap, title, chunk
        assert [seg.kind for seg in segments][-1] == "chunk" and len(segments) == 6
        primed = rag.reuse.exact_keys(segments)[5]
        kv = rag.store.get(primed, upload=False)
        assert kv is not None and kv.context == (primer.content_hash,) and "cci" in kv.extras
        assert kv.start == sum(len(seg.token_ids) for seg in segments[:-1])
    assert rag.primed_segments(primer, [primer]) is None and rag.primed_segments(others[0], []) is None

    # The primed entries are exact behind the primer: that prompt reuses both chunks as stored and is full prefill.
    full, *_ = rag.prefill(QUESTION, [primer, others[0]], mode="full")
    exact, _c, _p, stats = rag.prefill(QUESTION, [primer, others[0]], mode="prefix")
    assert stats["cache_hits"] == 2 and stats["recomputed_tokens"] == 0 and (full - exact).abs().max() < 1e-4


def test_a_warm_without_a_primer_stores_only_shared_entries(folder):
    rag = _rag(folder)
    chunks = _chunks(rag)
    assert rag.warm(chunks, progress=False) == len(chunks)
    assert all(_variants(rag, chunk) == [rag.keys.shared(chunk.token_ids)] for chunk in chunks)
    assert rag.warm(chunks, progress=False, primers=[chunks[0]]) == len(chunks) - 1  # priming later adds the rest


def test_a_chunk_behind_passages_reuses_its_primed_variant_and_a_leading_chunk_its_shared_one(folder):
    rag = _rag(folder)
    chunks = _chunks(rag)
    primer = chunks[3]
    rag.warm(chunks, progress=False, primers=[primer])
    prompt = [chunks[1], chunks[2]]
    plan = rag.reuse.plan(rag.prompt.segments(QUESTION, prompt), dataclasses.replace(rag.settings, mode="query"))
    by_chunk = {plan.segments[i].token_ids: key for i, key in plan.keys.items() if i}
    assert by_chunk[tuple(chunks[1].token_ids)] == rag.keys.shared(chunks[1].token_ids)
    second = by_chunk[tuple(chunks[2].token_ids)]
    assert second != rag.keys.shared(chunks[2].token_ids) and second in _variants(rag, chunks[2])
    assert plan.entries[max(plan.entries)].context == (primer.content_hash,)


def test_a_cache_warmed_without_a_primer_is_still_read(folder):
    rag = _rag(folder)
    chunks = _chunks(rag)
    rag.warm(chunks, progress=False)  # as every cache written before primed entries
    prompt = [chunks[2], chunks[1], chunks[3]]
    full, *_ = rag.prefill(QUESTION, prompt, mode="full")
    _logits, _c, _p, stats = rag.prefill(QUESTION, prompt, mode="query")
    assert stats["cache_hits"] == 3 and 0 < stats["recomputed_tokens"] < stats["context_tokens"]
    every, _c, _p, stats = rag.prefill(QUESTION, prompt, mode="query", ratio=1.0)
    assert stats["cache_hits"] == 3 and (full - every).abs().max() < 1e-4
