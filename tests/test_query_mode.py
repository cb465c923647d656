"""The query-aware selector (`query` mode): its budget, its first pass, and that budget 1 is full prefill."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chunk_cache.modes import MODES, Candidates, ReusedChunk, ReuseSettings, recompute_budget
from ragkit.config import CacheConfig, GeneratorConfig
from ragkit.errors import ConfigError
from tests.conftest import text_chunks, tiny_llama

QUESTION = "Where is Exeter College?"
TEXTS = ["Exeter College is in Oxford, on Turl Street.", "The Thames flows through Oxford and London.",
         "Rivers carry boats past colleges and bridges."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("query") / "model", layers=3)


def _rag(folder):
    from generators.rag import RagGenerator

    generator = {**dataclasses.asdict(GeneratorConfig()), "model": str(folder), "max_new_tokens": 3}
    return RagGenerator(generator, {**dataclasses.asdict(CacheConfig()), "dir": ""})


def _chunks(rag, titled: bool = True):
    return text_chunks(rag, TEXTS, title="Title" if titled else "")


@pytest.mark.parametrize("case", ["cold", "exact", "rotated"])
def test_query_at_budget_one_is_full_prefill(folder, case):
    """cold: nothing cached; exact: untitled chunks warmed in prompt order (the leading one sits behind exactly
    the head it was encoded behind); rotated: warmed chunks reused at other positions, in reverse order."""
    rag = _rag(folder)
    chunks = _chunks(rag, titled=case != "exact")
    if case != "cold":
        rag.warm(chunks, progress=False)
    prompt = chunks[::-1] if case == "rotated" else chunks
    full, *_ = rag.prefill(QUESTION, prompt, mode="full")
    logits, _cache, _pos, stats = rag.prefill(QUESTION, prompt, mode="query", ratio=1.0)
    assert stats["cache_hits"] == {"cold": 0, "exact": 3, "rotated": 3}[case]
    assert (full - logits).abs().max() < 1e-4
    exact_rows = len(chunks[0].token_ids) if case == "exact" else 0  # the leading chunk is exact: kept as is
    assert stats["recomputed_tokens"] == stats["context_tokens"] - exact_rows
    tokens = dataclasses.replace(rag.settings, mode="query", ratio=0.0, recompute_tokens=10 ** 6)
    by_count, *_ = rag.prefill(QUESTION, prompt, **dataclasses.asdict(tokens))
    assert (full - by_count).abs().max() < 1e-4  # a row budget past the reused rows is every row


def test_query_at_budget_zero_is_naive_and_leaves_no_trace_of_its_first_pass(folder):
    rag = _rag(folder)
    chunks = _chunks(rag)
    rag.warm(chunks, progress=False)
    naive, *_ = rag.prefill(QUESTION, chunks[::-1], mode="naive")
    probed, _cache, _pos, stats = rag.prefill(QUESTION, chunks[::-1], mode="query", ratio=0.0, recompute_tokens=0)
    assert (naive - probed).abs().max() < 1e-5 and stats["recomputed_tokens"] == 0 and stats["probe_s"] == 0.0
    full, *_ = rag.prefill(QUESTION, chunks[::-1], mode="full")
    half, _c, _p, half_stats = rag.prefill(QUESTION, chunks[::-1], mode="query", ratio=0.5)
    reused = half_stats["context_tokens"]
    assert half_stats["recomputed_tokens"] == -(-reused // 2) and half_stats["probe_s"] > 0
    some, _c, _p, some_stats = rag.prefill(QUESTION, chunks[::-1], mode="query", recompute_tokens=5)
    assert some_stats["recomputed_tokens"] == 5
    kl = lambda p, q: float((p.log_softmax(-1).exp() * (p.log_softmax(-1) - q.log_softmax(-1))).sum())  # noqa: E731
    assert kl(full, half) < kl(full, naive)


def test_the_first_pass_scores_rows_by_the_questions_attention_in_every_layer(folder):
    """The fused score is, averaged over every layer, the attention each reused row receives from the question
    rows (summed over rows, averaged over heads) as a share of what all reused rows receive; each layer's
    question rows come from running them through the layers below over the reused cache (reference: reuse's
    check and the decoder's own layer)."""
    from chunk_cache.assembly import CHUNK
    from chunk_cache.probe import question_attention
    from chunk_cache.reuse import _attention_received

    rag = _rag(tiny_llama(folder.parent / "three-layers", layers=3, init_range=0.2))
    chunks = _chunks(rag)
    rag.warm(chunks, progress=False)
    plan = rag.reuse.plan(rag.prompt.segments(QUESTION, chunks[::-1]), ReuseSettings(mode="naive"))
    layout, cache = rag.reuse.assemble(plan, 0)
    reused = torch.zeros(layout.size, dtype=torch.bool)
    for index, seg in enumerate(plan.segments):
        if seg.kind == CHUNK:
            reused[layout.spans[index][0]: layout.spans[index][1]] = True
    question = torch.arange(int(reused.nonzero().max()) + 1, layout.size)
    score = question_attention(rag.model, layout.token_ids[question], layout.positions[question], question, cache,
                               reused)
    model, positions = rag.model, layout.positions[question][None]
    x, rope = model.embed_tokens(layout.token_ids[question][None]), model.rope(positions)
    shares = []
    for layer in range(model.args.n_layers):
        q, _k, _v = model.qkv(layer, x, rope)
        x = model.layer(layer, x, positions, question, cache, rope, model.masks_for(cache, positions, question))
        read = _attention_received(model, layer, q, positions, cache)
        shares.append(torch.where(reused, read / read[reused].sum(), 0.0))
    assert not torch.allclose(shares[0], shares[-1], atol=1e-3)  # the last layer's share counts, and differs
    assert torch.allclose(score, torch.stack(shares).mean(0), atol=1e-5) and abs(float(score.sum()) - 1.0) < 1e-5


def test_the_rule_picks_each_chunks_first_row_then_the_highest_scored_rows_weighted_by_staleness():
    scores = torch.tensor([0.0, 0.0, 0.1, 0.5, 0.2, 0.9, 0.0, 0.3, 0.0, 0.0])  # rows 0-1, 8-9 are not reused
    settings = ReuseSettings(mode="query", ratio=0.34)  # ceil(0.34 * 6) = 3 rows

    def picks(extras):
        chunk = ReusedChunk(2, 8, extras, 0.0)
        return MODES["query"].static(Candidates(10, [chunk], lambda: scores), settings).nonzero()[:, 0].tolist()

    # plus half the best score within one row: 0.35, 0.75, 0.65, 1.35, 0.45, 0.45; row 2 goes first (the sink),
    # then 5 and 3; an entry without stored statistics (or with another length) is ranked by the score alone
    assert picks({}) == [2, 3, 5] and picks({"inter": torch.ones(4)}) == [2, 3, 5]
    # row 5 barely attended outside its chunk when stored: its K/V are nearly what the new context gives
    assert picks({"inter": torch.tensor([1.0, 1.0, 1.0, 0.1, 1.0, 1.0])}) == [2, 3, 4]
    assert recompute_budget(ReuseSettings(ratio=0.5, recompute_tokens=4), 6) == 4
    assert recompute_budget(ReuseSettings(ratio=0.5, recompute_tokens=40), 6) == 6
    never = Candidates(10, [ReusedChunk(2, 8, {}, 0.0)], lambda: pytest.fail("budget 1 needs no first pass"))
    assert MODES["query"].static(never, ReuseSettings(mode="query", ratio=1.0)).sum() == 6
    for bad in (ReuseSettings(ratio=1.5), ReuseSettings(recompute_tokens=-1)):
        with pytest.raises(ConfigError, match="cache.(ratio|recompute_tokens)"):
            recompute_budget(bad, 6)


def test_entries_without_statistics_are_reused_and_query_misses_store_them(folder):
    """An entry stored by a mode that collects no statistics (as every entry before them) is still reused;
    the chunks `query` computes itself are stored with their per-token inter-chunk attention."""
    rag = _rag(folder)
    chunks = _chunks(rag)
    rag.prefill(QUESTION, chunks, mode="naive")[3]["commit"](0.0)  # cold: stores the chunks without statistics
    keys = [rag.store.variants(rag.keys.dtype, rag.keys.shared(c.token_ids).chunk_hash) for c in chunks]
    assert all(keys) and not any("inter" in rag.store.get(k[0]).extras for k in keys)
    logits, _cache, _pos, stats = rag.prefill(QUESTION, chunks[::-1], mode="query", ratio=0.3)
    assert stats["cache_hits"] == 3 and stats["probe_s"] > 0 and torch.isfinite(logits).all()
    fresh = _rag(folder)
    fresh.prefill(QUESTION, chunks, mode="query", ratio=0.3)[3]["commit"](0.0)  # cold: computes and stores them
    for chunk in chunks:
        key = fresh.store.variants(fresh.keys.dtype, fresh.keys.shared(chunk.token_ids).chunk_hash)[0]
        assert len(fresh.store.get(key).extras["inter"]) == len(chunk.token_ids)
