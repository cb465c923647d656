"""Benchmark protocols: the run and qrels changes each official script makes before scoring.

- beir (beir-cellar/beir `EvaluateRetrieval.evaluate`, ignore_identical_ids=True): only queries
  with judgements; a hit whose id equals the query id is dropped; top `depth` kept.
- bright (xlang-ai/BRIGHT `retrievers.py`): the query's `excluded_ids` are removed *before*
  the top-`depth` cut, so excluded documents neither score nor use up ranks; relevance is
  binary (every gold id grade 1). BRIGHT asserts that excluded and gold ids are disjoint; where
  they are not, the pair is dropped from the qrels too, so an excluded document is never owed
  credit either. The long_documents setting changes only the corpus and gold ids (the reader's
  job) and the headline metric (recall@1, see `headline_metrics`).
- coir (CoIR-team/coir `evaluation.py`): only queries with judgements; self-match dropped
  (ignore_identical_ids=True); top `depth`. Titles are ignored when indexing
  (`dataset.title = false`), which is the reader's business, not the scorer's.

Every protocol also restricts the qrels to the queries passed in, so `limit_queries` slices
are scored against their own judgements only.
"""

from __future__ import annotations

from ragkit.errors import ConfigError
from ragkit.types import Hit, Qrels, Query, Run

from eval.retrieval import ordered_hits

PROTOCOLS = ("beir", "bright", "coir")

# The metrics each benchmark's own script reports; the first is the leaderboard headline.
_HEADLINE = {
    "beir": ["ndcg@10", "map@100", "recall@100", "p@10", "mrr"],
    "coir": ["ndcg@10", "map@10", "recall@10", "p@10", "mrr"],
    "bright": ["ndcg@10", "map@100", "recall@100", "recall@1", "p@10", "mrr"],
    "bright-long": ["recall@1", "ndcg@10", "recall@100", "mrr"],
}


def headline_metrics(protocol: str, long_documents: bool = False) -> list[str]:
    """Metrics a benchmark's own leaderboard reports, headline first."""
    _check(protocol)
    return list(_HEADLINE["bright-long" if protocol == "bright" and long_documents else protocol])


def _check(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigError("eval.protocol", f"unknown protocol {protocol!r}", allowed=list(PROTOCOLS))


def _rerank(hits: list[Hit], depth: int) -> list[Hit]:
    return [Hit(h.id, h.score, rank) for rank, h in enumerate(hits[:depth], 1)]


def apply_protocol(protocol: str, run: Run, queries: list[Query], qrels: Qrels,
                   depth: int = 1000) -> tuple[Run, Qrels]:
    """Return (run, qrels) as the benchmark's script would score them.

    'beir' | 'bright' | 'coir': exclusions, self-match drop, query filtering, cut to `depth`.
    The run keeps one entry per judged query (empty if it retrieved nothing), so that
    `score_run` counts it as 0 rather than losing it.
    """
    _check(protocol)
    if depth <= 0:
        raise ConfigError("eval.depth", f"must be > 0, got {depth}")
    judged: dict[str, dict[str, int]] = {}
    excluded: dict[str, frozenset[str]] = {}
    for query in queries:
        docs = dict(qrels.get(query.id, {}))
        if protocol == "bright":
            excluded[query.id] = query.excluded_ids - {"N/A"}
            docs = {d: 1 for d, g in docs.items() if g > 0 and d not in excluded[query.id]}
        if docs:
            judged[query.id] = docs

    rankings: dict[str, list[Hit]] = {}
    for qid in judged:
        hits = ordered_hits(run.get(qid, []))
        if protocol == "bright":
            hits = [h for h in hits if h.id not in excluded[qid]]
        else:
            hits = [h for h in hits if h.id != qid]
        rankings[qid] = _rerank(hits, depth)
    return Run(rankings, name=run.name), Qrels(judged)
