"""Retrieval metrics: hand-computed cases, a pure-Python reference, and pytrec_eval on SciFact BM25."""

from __future__ import annotations

import math

import pytest
import pytrec_eval
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.retrieval import parse_metric, score_run, unjudged_queries
from ragkit.errors import ConfigError
from ragkit.types import Hit, Qrels, Run, rank_hits
from tests.eval_fixtures import scifact_bm25_run

LOG2_3 = math.log2(3)


def _run(rankings: dict[str, list[str]]) -> Run:
    """A run from ranked id lists (scores decreasing along each list)."""
    return Run({q: [Hit(d, float(len(ids) - i), i + 1) for i, d in enumerate(ids)] for q, ids in rankings.items()})


def test_hand_computed_metrics_and_missing_queries_count_zero():
    qrels = Qrels({"q1": {"a": 2, "b": 0, "c": 1}, "q2": {"d": 1}, "q3": {"e": 1}})
    run = _run({"q1": ["a", "x", "c"], "q3": []})  # q2 absent, q3 empty
    metrics = ["ndcg@10", "ndcg@1", "map@100", "map@2", "recall@100", "recall@1", "p@10", "mrr"]
    aggregate, per_query = score_run(run, qrels, metrics)

    # Linear gains: DCG = 2/log2(2) + 1/log2(4) = 2.5; ideal = 2 + 1/log2(3).
    q1 = per_query["q1"]
    assert q1["ndcg@10"] == pytest.approx(2.5 / (2 + 1 / LOG2_3))
    assert q1["ndcg@1"] == pytest.approx(1.0)
    assert q1["map@100"] == pytest.approx((1 + 2 / 3) / 2)  # relevant at ranks 1 and 3
    assert q1["map@2"] == pytest.approx(1 / 2)               # trec_eval divides by all relevant
    assert q1["recall@100"] == 1.0 and q1["recall@1"] == 0.5
    assert q1["p@10"] == pytest.approx(0.2)                   # divides by the cutoff, not by hits
    assert q1["mrr"] == 1.0
    assert set(per_query) == {"q1", "q2", "q3"}
    for qid in ("q2", "q3"):
        assert all(value == 0.0 for value in per_query[qid].values())
    assert aggregate["ndcg@10"] == pytest.approx(q1["ndcg@10"] / 3)
    assert aggregate["mrr"] == pytest.approx(1 / 3)


def test_run_order_wins_over_trec_eval_tie_breaking():
    qrels = Qrels({"q": {"a": 1}})
    tied = Run({"q": rank_hits({"a": 1.0, "b": 1.0})})  # rank_hits: ties by id ascending -> a first
    assert [h.id for h in tied["q"]] == ["a", "b"]
    assert score_run(tied, qrels, ["mrr"])[1]["q"]["mrr"] == 1.0
    # pytrec_eval alone breaks the tie by id descending and puts b first:
    raw = pytrec_eval.RelevanceEvaluator(qrels.to_dict(), {"recip_rank"}).evaluate(tied.scores())
    assert raw["q"]["recip_rank"] == 0.5
    # The run's own ranks decide, even against the scores' tie: b ranked first -> 0.5.
    b_first = Run({"q": [Hit("b", 1.0, 1), Hit("a", 1.0, 2)]})
    assert score_run(b_first, qrels, ["mrr"])[1]["q"]["mrr"] == 0.5


def test_duplicates_unjudged_and_zero_grade_queries():
    qrels = Qrels({"q": {"a": 1, "b": 1}, "z": {"a": 0}})
    run = Run({"q": [Hit("a", 3.0, 1), Hit("a", 2.0, 2), Hit("c", 1.0, 3)], "z": [Hit("a", 1.0, 1)],
               "extra": [Hit("a", 1.0, 1)]})
    _, per_query = score_run(run, qrels, ["p@2", "recall@10"])
    assert per_query["q"]["p@2"] == 0.5       # the repeated "a" counts once
    assert per_query["z"] == {"p@2": 0.0, "recall@10": 0.0}  # judged, nothing relevant: kept, 0
    assert "extra" not in per_query
    assert unjudged_queries(run, qrels) == ["extra"]


def test_mrr_cutoff_only_sees_top_k():
    qrels = Qrels({"q": {"c": 1}})
    _, per_query = score_run(_run({"q": ["a", "b", "c"]}), qrels, ["mrr", "mrr@2", "mrr@3"])
    assert per_query["q"] == {"mrr": pytest.approx(1 / 3), "mrr@2": 0.0, "mrr@3": pytest.approx(1 / 3)}


@pytest.mark.parametrize("name", ["ndcg", "bleu@10", "ndcg@0", "recall@x", ""])
def test_bad_metric_names_raise_config_error(name):
    with pytest.raises(ConfigError, match="eval.metrics"):
        parse_metric(name)


# -- a plain-Python reference of the trec_eval definitions ------------------------------------------
def _reference(ranking: list[str], judged: dict[str, int], k: int) -> dict[str, float]:
    relevant = {d for d, g in judged.items() if g > 0}
    top = ranking[:k]
    gains = [max(judged.get(d, 0), 0) for d in top]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    ideal = sorted((max(g, 0) for g in judged.values()), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    hits, precisions = 0, []
    for i, d in enumerate(top):
        if d in relevant:
            hits += 1
            precisions.append(hits / (i + 1))
    first = next((i + 1 for i, d in enumerate(ranking) if d in relevant), None)
    return {
        f"ndcg@{k}": dcg / idcg if idcg else 0.0,
        f"map@{k}": sum(precisions) / len(relevant) if relevant else 0.0,
        f"recall@{k}": hits / len(relevant) if relevant else 0.0,
        f"p@{k}": hits / k,
        "mrr": 1 / first if first else 0.0,
    }


docs = st.sampled_from([f"d{i}" for i in range(12)])


@settings(max_examples=60, deadline=None)
@given(
    judged=st.dictionaries(docs, st.integers(0, 3), min_size=1, max_size=6),
    scores=st.dictionaries(docs, st.integers(0, 4).map(float), max_size=10),  # integer scores: many ties
    k=st.sampled_from([1, 3, 5, 10]),
)
def test_matches_reference_implementation(judged, scores, k):
    run = Run({"q": rank_hits(scores)})
    names = [f"ndcg@{k}", f"map@{k}", f"recall@{k}", f"p@{k}", "mrr"]
    _, per_query = score_run(run, Qrels({"q": judged}), names)
    expected = _reference([h.id for h in run["q"]], judged, k)
    for name in names:
        assert per_query["q"][name] == pytest.approx(expected[name], abs=1e-9), name


# -- acceptance: SciFact BM25 against pytrec_eval --------------------------------------------------
@pytest.fixture(scope="module")
def scifact_bm25():
    return scifact_bm25_run()


@pytest.mark.slow
def test_scifact_bm25_equals_pytrec_eval_with_empty_queries_as_zero(scifact_bm25):
    run, qrels = scifact_bm25
    # Three queries retrieved nothing: one empty list, two missing from the run altogether.
    judged = sorted(qrels)
    rankings = dict(run.items())
    rankings[judged[0]] = []
    del rankings[judged[1]], rankings[judged[2]]
    run = Run(rankings)
    metrics = {"ndcg@10": "ndcg_cut_10", "map@100": "map_cut_100", "recall@100": "recall_100"}
    aggregate, per_query = score_run(run, qrels, list(metrics))

    evaluator = pytrec_eval.RelevanceEvaluator(qrels.to_dict(), {"ndcg_cut.10", "map_cut.100", "recall.100"})
    official = evaluator.evaluate({q: run.scores().get(q, {}) for q in qrels})  # every query key present
    dropped = evaluator.evaluate(run.scores())                                     # pytrec_eval's default
    assert len(per_query) == len(qrels) == 300
    for ours, theirs in metrics.items():
        expected = sum(official[q][theirs] for q in qrels) / len(qrels)
        assert round(aggregate[ours], 4) == round(expected, 4), ours
        naive = sum(v[theirs] for v in dropped.values()) / len(dropped)
        assert naive > aggregate[ours]  # dropping the two absent queries would inflate the score
    assert aggregate["ndcg@10"] == pytest.approx(0.67, abs=0.03)  # Pyserini flat BM25: 0.6789
