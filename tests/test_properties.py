"""Property tests (hypothesis): invariants that must hold for any input, not just hand-picked cases.

- metrics: every value lies in [0, 1]; a perfect run scores 1.0; recall@k grows with k;
- RoPE re-rotation: by a then by b equals by a + b; by 0 is the identity; by -a undoes a;
  it preserves each rotated pair's length; a per-token shift equals shifting each token alone;
- fusion (RRF and weighted): a ranking of the union whose top-k is a prefix; independent of the
  retrievers' order; fusing a list with itself keeps it; min-max fusion ignores affine score
  scales; RRF never ranks a document below one it beats in every list;
- chunking: the one-pass sentence-break scan equals its direct definition.
(Chunk span coverage is property-tested in tests/test_chunking.py.)
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunk_cache.rope import rerotate
from eval.retrieval import score_run
from retrievers.fusion import fuse
from ragkit.chunking import SENTENCE_END, _sentence_breaks
from ragkit.types import Hit, Qrels, Run, rank_hits

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
METRICS = ["ndcg@5", "ndcg@10", "map@10", "recall@5", "recall@10", "p@5", "mrr", "mrr@3"]

# -- metrics ------------------------------------------------------------------------------------

doc_ids = st.sampled_from([f"d{i}" for i in range(12)])
query_ids = st.sampled_from([f"q{i}" for i in range(4)])
judgements = st.dictionaries(doc_ids, st.integers(0, 3), min_size=1, max_size=8)
qrels_strategy = st.dictionaries(query_ids, judgements, min_size=1, max_size=4)


@st.composite
def run_for(draw, qids):
    """A run over some of the judged queries (and maybe an unjudged one), with arbitrary scores."""
    rankings = {}
    for qid in draw(st.lists(st.sampled_from(sorted(qids) + ["q_unjudged"]), unique=True)):
        scores = draw(st.dictionaries(doc_ids, st.floats(-5, 5, allow_nan=False), max_size=12))
        rankings[qid] = rank_hits(scores)
    return Run(rankings)


@FAST
@given(data=st.data(), judged=qrels_strategy)
def test_metrics_lie_in_unit_interval(data, judged):
    run = data.draw(run_for(set(judged)))
    aggregate, per_query = score_run(run, Qrels(judged), METRICS)
    assert set(per_query) == set(judged)  # every judged query counts, unjudged ones do not
    for values in [aggregate, *per_query.values()]:
        assert set(values) == set(METRICS)
        assert all(0.0 <= v <= 1.0 + 1e-12 for v in values.values()), values


def _perfect_run(judged: dict[str, dict[str, int]]) -> Run:
    """Relevant documents first, by grade descending; then the judged non-relevant ones."""
    rankings = {}
    for qid, docs in judged.items():
        ordered = sorted(docs, key=lambda d: (-docs[d], d))
        rankings[qid] = [Hit(d, float(len(ordered) - i), i + 1) for i, d in enumerate(ordered)]
    return Run(rankings)


@FAST
@given(judged=st.dictionaries(query_ids, st.dictionaries(doc_ids, st.integers(1, 3), min_size=1, max_size=5)
                              .flatmap(lambda rel: st.dictionaries(doc_ids, st.just(0), max_size=4)
                                       .map(lambda zeros: {**zeros, **rel})), min_size=1, max_size=4))
def test_perfect_run_scores_one(judged):
    # Cut-offs of 5 and 10 reach every relevant document (at most 5 per query).
    aggregate, _ = score_run(_perfect_run(judged), Qrels(judged), ["ndcg@5", "ndcg@10", "map@10", "recall@5", "mrr"])
    assert aggregate == pytest.approx({"ndcg@5": 1.0, "ndcg@10": 1.0, "map@10": 1.0, "recall@5": 1.0, "mrr": 1.0})


@FAST
@given(data=st.data(), judged=qrels_strategy)
def test_recall_and_ndcg_of_empty_run_are_zero_and_recall_grows_with_k(data, judged):
    empty, _ = score_run(Run({}), Qrels(judged), METRICS)
    assert all(v == 0.0 for v in empty.values())
    run = data.draw(run_for(set(judged)))
    _, per_query = score_run(run, Qrels(judged), ["recall@1", "recall@3", "recall@10"])
    for values in per_query.values():
        assert values["recall@1"] <= values["recall@3"] <= values["recall@10"]


# -- RoPE re-rotation ---------------------------------------------------------------------------

HEAD_DIM = 16
INV_FREQ = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
shifts = st.integers(-4096, 4096)


def _keys(seed: int, tokens: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, tokens, HEAD_DIM, generator=generator)  # [B, H_kv, T, D]


@FAST
@given(seed=st.integers(0, 2**16), a=shifts, b=shifts)
def test_rerotate_a_then_b_equals_a_plus_b(seed, a, b):
    keys = _keys(seed)
    two_steps = rerotate(rerotate(keys, a, INV_FREQ), b, INV_FREQ)
    torch.testing.assert_close(two_steps, rerotate(keys, a + b, INV_FREQ), atol=1e-4, rtol=1e-4)


@FAST
@given(seed=st.integers(0, 2**16), a=shifts)
def test_rerotate_identity_inverse_and_norm(seed, a):
    keys = _keys(seed)
    assert torch.equal(rerotate(keys, 0, INV_FREQ), keys)
    moved = rerotate(keys, a, INV_FREQ)
    torch.testing.assert_close(rerotate(moved, -a, INV_FREQ), keys, atol=1e-4, rtol=1e-4)
    half = HEAD_DIM // 2  # rotate-half layout: coordinate i turns with i + D/2
    pair_norm = lambda k: k[..., :half] ** 2 + k[..., half:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(moved), pair_norm(keys), atol=1e-4, rtol=1e-4)


@FAST
@given(seed=st.integers(0, 2**16), deltas=st.lists(shifts, min_size=5, max_size=5))
def test_per_token_shift_equals_each_token_alone(seed, deltas):
    keys = _keys(seed)
    together = rerotate(keys, torch.tensor(deltas), INV_FREQ)
    for t, delta in enumerate(deltas):
        alone = rerotate(keys[:, :, t:t + 1], delta, INV_FREQ)
        torch.testing.assert_close(together[:, :, t:t + 1], alone, atol=1e-5, rtol=1e-5)


def test_rerotate_matches_rope_at_the_new_position():
    """RoPE applied at p, then moved by d, equals RoPE applied at p + d (the reason reuse works)."""
    raw = _keys(7, tokens=1)

    def rope_at(x, position):
        angles = position * INV_FREQ.double()
        cos = torch.cat([angles.cos(), angles.cos()]).float()
        sin = torch.cat([angles.sin(), angles.sin()]).float()
        half = HEAD_DIM // 2
        rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated_half * sin

    for p, d in [(0, 5), (17, 300), (1000, -999), (3, 0)]:
        torch.testing.assert_close(rerotate(rope_at(raw, p), d, INV_FREQ), rope_at(raw, p + d), atol=1e-4, rtol=1e-4)


# -- fusion -------------------------------------------------------------------------------------

fusion_ids = st.sampled_from([f"c{i}" for i in range(10)])
# Integer scores make ties likely and keep affine rescaling exact in float64.
result_list = st.dictionaries(fusion_ids, st.integers(-20, 20), max_size=10).map(rank_hits)
result_lists = st.lists(result_list, min_size=1, max_size=4)
fusion_method = st.sampled_from([("rrf", "minmax"), ("weighted", "minmax"), ("weighted", "zscore")])


def _fused(lists, method, k=100, weights=None):
    return fuse([[hits] for hits in lists], method[0], k=k, weights=weights, normalization=method[1])[0]


@FAST
@given(lists=result_lists, method=fusion_method, k=st.integers(1, 12))
def test_fusion_is_a_ranking_of_the_union_and_k_is_a_prefix(lists, method, k):
    full = _fused(lists, method)
    assert {h.id for h in full} == {h.id for hits in lists for h in hits}
    assert [h.rank for h in full] == list(range(1, len(full) + 1))
    assert all((a.score, b.id) >= (b.score, a.id) for a, b in zip(full, full[1:]))  # score desc, then id asc
    assert _fused(lists, method, k=k) == full[:k]


@FAST
@given(lists=result_lists, method=fusion_method, data=st.data())
def test_fusion_ignores_the_order_of_retrievers(lists, method, data):
    weights = data.draw(st.lists(st.floats(0.1, 3.0), min_size=len(lists), max_size=len(lists)))
    order = data.draw(st.permutations(range(len(lists))))
    fused = _fused(lists, method, weights=weights)
    swapped = _fused([lists[i] for i in order], method, weights=[weights[i] for i in order])
    assert {h.id: h.score for h in swapped} == pytest.approx({h.id: h.score for h in fused})
    # Summing in another order may move a score by an ulp: only such near-ties may swap.
    canonical = lambda hits: [h.id for h in sorted(hits, key=lambda h: (-round(h.score, 9), h.id))]  # noqa: E731
    assert canonical(swapped) == canonical(fused)


@FAST
@given(hits=result_list, method=fusion_method, copies=st.integers(1, 3))
def test_fusing_one_ranking_with_itself_keeps_its_order(hits, method, copies):
    assert [h.id for h in _fused([hits] * copies, method)] == [h.id for h in hits]


@FAST
@given(lists=result_lists, scale=st.integers(1, 8), shift=st.integers(-50, 50), weight_scale=st.integers(1, 4))
def test_minmax_fusion_ignores_affine_score_scales_and_weight_scale(lists, scale, shift, weight_scale):
    method = ("weighted", "minmax")
    rescaled = [rank_hits({h.id: scale * h.score + shift for h in hits}) for hits in lists]
    weights = [1.0 + i for i in range(len(lists))]
    expected = _fused(lists, method, weights=weights)
    assert _fused(rescaled, method, weights=weights) == expected
    fused = _fused(lists, method, weights=[weight_scale * w for w in weights])
    assert [h.id for h in fused] == [h.id for h in expected]
    assert all(-1e-9 <= h.score <= weight_scale * sum(weights) + 1e-9 for h in fused)


@FAST
@given(lists=result_lists.filter(lambda ls: any(ls)), data=st.data())
def test_rrf_favours_a_document_that_is_ahead_everywhere(lists, data):
    """d listed wherever e is, and ranked above it in each such list, never ends below e."""
    union = sorted({h.id for hits in lists for h in hits})
    d, e = data.draw(st.sampled_from(union)), data.draw(st.sampled_from(union))
    rank = [{h.id: h.rank for h in hits} for hits in lists]
    dominates = all((d in r) and (e not in r or r[d] <= r[e]) for r in rank if d in r or e in r)
    scores = {h.id: h.score for h in _fused(lists, ("rrf", "minmax"))}
    if dominates:
        assert scores[d] >= scores[e]


# -- chunking -----------------------------------------------------------------------------------


def _sentence_breaks_by_definition(text, offsets):
    """The direct (quadratic) definition that ragkit.chunking computes in one pass."""
    breaks = []
    for i, (_start, end) in enumerate(offsets):
        closing = text[:end].rstrip()[-1:] in SENTENCE_END if end else False
        fresh = i + 1 == len(offsets) or text[end:end + 1].isspace() or text[end - 1:end] == "\n"
        breaks.append(closing and fresh)
    return breaks


@FAST
@given(text=st.text(alphabet=st.sampled_from(list("ab .!?;:\n\t")), max_size=80), data=st.data())
def test_sentence_breaks_equal_their_definition(text, data):
    ends = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=20)))
    if data.draw(st.booleans()) and len(ends) > 2:
        ends[1], ends[2] = ends[2], ends[1]  # out-of-order offsets take the direct path
    offsets = [(max(0, e - 1), e) for e in ends]
    assert _sentence_breaks(text, offsets) == _sentence_breaks_by_definition(text, offsets)
