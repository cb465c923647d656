"""Benchmark protocols: each official-script rule on a hand-computed case, plus BRIGHT's bundled examples."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from eval.protocols import apply_protocol, headline_metrics
from eval.retrieval import score_run
from ragkit.config import DatasetConfig
from ragkit.errors import ConfigError
from ragkit.types import Hit, Qrels, Query, Run

DATA = Path(__file__).resolve().parent.parent / "data"


def _run(rankings: dict[str, list[str]]) -> Run:
    return Run({q: [Hit(d, float(len(ids) - i), i + 1) for i, d in enumerate(ids)] for q, ids in rankings.items()})


def _ids(run: Run, qid: str) -> list[str]:
    return [h.id for h in run[qid]]


def test_bright_removes_exclusions_before_the_depth_cut():
    query = Query("q", "text", excluded_ids=frozenset({"x1", "x2"}))
    run = _run({"q": ["x1", "x2", "other", "gold"]})
    scored, qrels = apply_protocol("bright", run, [query], Qrels({"q": {"gold": 1}}), depth=2)
    # Cutting first would keep only x1, x2 and then lose everything; BRIGHT pops them first.
    assert _ids(scored, "q") == ["other", "gold"]
    assert [h.rank for h in scored["q"]] == [1, 2]
    _, per_query = score_run(scored, qrels, ["ndcg@10", "mrr"])
    assert per_query["q"]["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert per_query["q"]["mrr"] == 0.5


def test_bright_excluded_document_never_counts_even_when_relevant():
    query = Query("q", "text", excluded_ids=frozenset({"gold-but-excluded"}))
    qrels = Qrels({"q": {"gold": 1, "gold-but-excluded": 1}})
    scored, scored_qrels = apply_protocol("bright", _run({"q": ["gold-but-excluded", "gold"]}), [query], qrels)
    assert _ids(scored, "q") == ["gold"]
    assert scored_qrels["q"] == {"gold": 1}  # not owed credit either: recall is over the other gold only
    _, per_query = score_run(scored, scored_qrels, ["ndcg@10", "recall@100"])
    assert per_query["q"] == {"ndcg@10": 1.0, "recall@100": 1.0}


def test_bright_relevance_is_binary_and_na_means_no_exclusion():
    query = Query("q", "text", excluded_ids=frozenset({"N/A"}))
    qrels = Qrels({"q": {"a": 3, "b": 1, "c": 0}})
    scored, scored_qrels = apply_protocol("bright", _run({"q": ["b", "a", "N/A-is-not-an-id"]}), [query], qrels)
    assert scored_qrels["q"] == {"a": 1, "b": 1}
    assert len(scored["q"]) == 3
    _, per_query = score_run(scored, scored_qrels, ["ndcg@10"])
    assert per_query["q"]["ndcg@10"] == pytest.approx(1.0)  # with grade 3 kept, b-before-a would cost


def test_bright_long_documents_headline_is_recall_at_1():
    assert headline_metrics("bright", long_documents=True)[0] == "recall@1"
    assert headline_metrics("bright")[0] == "ndcg@10"


@pytest.mark.parametrize("protocol", ["coir", "beir"])
def test_self_match_dropped_and_only_judged_queries_kept(protocol):
    queries = [Query("q1", "text"), Query("q2", "no judgements"), Query("q3", "retrieved nothing")]
    qrels = Qrels({"q1": {"d1": 1}, "q3": {"d9": 1}, "q-not-asked": {"d1": 1}})
    run = _run({"q1": ["q1", "d1", "d2"], "q2": ["d1"]})
    scored, scored_qrels = apply_protocol(protocol, run, queries, qrels, depth=1)
    assert set(scored_qrels) == {"q1", "q3"}        # q2 unjudged; q-not-asked was not among the queries
    assert _ids(scored, "q1") == ["d1"]              # the query's own id is gone, then the cut to 1
    assert scored["q3"] == []                        # kept, so it scores 0 instead of vanishing
    aggregate, _ = score_run(scored, scored_qrels, ["ndcg@10"])
    assert aggregate["ndcg@10"] == pytest.approx(0.5)


def test_bright_keeps_a_document_named_like_the_query():
    # BRIGHT's script has no self-match rule: only excluded_ids are removed.
    scored, _ = apply_protocol("bright", _run({"7": ["7", "d"]}), [Query("7", "t")], Qrels({"7": {"7": 1}}))
    assert _ids(scored, "7") == ["7", "d"]


def test_unknown_protocol_and_bad_depth_are_config_errors():
    with pytest.raises(ConfigError, match="eval.protocol"):
        apply_protocol("msmarco", Run({}), [], Qrels({}))
    with pytest.raises(ConfigError, match="eval.depth"):
        apply_protocol("beir", Run({}), [], Qrels({}), depth=0)


def test_bright_rules_on_bundled_leetcode_examples_with_fixture_corpus():
    """BM25 over the fixture corpus ranks excluded stand-ins high; the protocol must remove all of them."""
    import bm25s

    from ragkit.readers import open_dataset
    from ragkit.types import rank_hits

    dataset = open_dataset(DatasetConfig(format="bright", domain="leetcode"), DATA / "bright")
    documents = list(dataset.documents())
    retriever = bm25s.BM25(k1=0.9, b=0.4)
    retriever.index(bm25s.tokenize([d.text for d in documents], show_progress=False), show_progress=False)
    ids, scores = retriever.retrieve(bm25s.tokenize([q.text for q in dataset.queries], show_progress=False),
                                     k=len(documents), show_progress=False, n_threads=1)
    run = Run({q.id: rank_hits({documents[i].id: float(s) for i, s in zip(row_ids, row_scores)})
               for q, row_ids, row_scores in zip(dataset.queries, ids, scores)})
    excluded_retrieved = sum(1 for q in dataset.queries for h in run[q.id] if h.id in q.excluded_ids)
    assert excluded_retrieved > 0, "the fixture should put excluded ids in the raw ranking"

    scored, qrels = apply_protocol("bright", run, dataset.queries, dataset.qrels, depth=10)
    for query in dataset.queries:
        kept = _ids(scored, query.id)
        assert not set(kept) & query.excluded_ids
        assert len(kept) == min(10, len(run[query.id]) - len(query.excluded_ids & set(_ids(run, query.id))))
        assert not set(qrels[query.id]) & query.excluded_ids
    raw, _ = score_run(Run({q: hits[:10] for q, hits in run.items()}), dataset.qrels, ["ndcg@10"])
    official, _ = score_run(scored, qrels, ["ndcg@10"])
    assert official["ndcg@10"] > raw["ndcg@10"]  # excluded stand-ins no longer take the top ranks
