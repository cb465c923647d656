"""Retrieval metrics computed by pytrec_eval (trec_eval's C code), as BEIR, BRIGHT and CoIR do.

Two pytrec_eval habits are corrected so that a number means what it says:
- a query the run has no entry for silently drops out of trec_eval's average; here every
  judged query counts, and one without results scores 0 (the `trec_eval -c` convention);
- trec_eval re-sorts by score and breaks exact ties by document id *descending*; here the
  run's own order (rank, then id ascending, like `ragkit.types.rank_hits`) is what gets
  scored, by handing pytrec_eval strictly decreasing pseudo-scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytrec_eval

from ragkit.errors import ConfigError
from ragkit.types import Hit, Qrels, Run

# ragkit metric family -> (pytrec_eval measure, per-query output key prefix)
_FAMILIES = {
    "ndcg": ("ndcg_cut", "ndcg_cut_"),
    "map": ("map_cut", "map_cut_"),
    "recall": ("recall", "recall_"),
    "p": ("P", "P_"),
}
_NAME = re.compile(r"^(ndcg|map|recall|p|mrr)(?:@([1-9][0-9]*))?$")


@dataclass(frozen=True)
class Metric:
    """A parsed metric name such as 'ndcg@10' or 'mrr'."""

    name: str
    family: str
    cutoff: int | None


def parse_metric(name: str) -> Metric:
    """'ndcg@10', 'map@100', 'recall@100', 'p@10', 'mrr', 'mrr@10' (any cutoff)."""
    match = _NAME.match(name.strip().lower())
    if not match:
        raise ConfigError("eval.metrics", f"unknown metric {name!r}",
                          allowed=["ndcg@k", "map@k", "recall@k", "p@k", "mrr", "mrr@k"])
    family, cutoff = match.group(1), match.group(2)
    if family != "mrr" and cutoff is None:
        raise ConfigError("eval.metrics", f"metric {name!r} needs a cutoff, e.g. {family}@10")
    return Metric(name.strip().lower(), family, int(cutoff) if cutoff else None)


def ordered_hits(hits: list[Hit]) -> list[Hit]:
    """The run's ranking, made deterministic: by rank, then score descending, then id ascending.

    A document listed twice keeps its best position only (trec_eval would count it twice).
    """
    seen: set[str] = set()
    ordered = []
    for hit in sorted(hits, key=lambda h: (h.rank, -h.score, h.id)):
        if hit.id not in seen:
            seen.add(hit.id)
            ordered.append(hit)
    return ordered


def _strict_scores(hits: list[Hit], depth: int | None = None) -> dict[str, float]:
    """Scores that decrease strictly along the run's order, so trec_eval cannot reorder ties."""
    ordered = ordered_hits(hits)[:depth]
    n = len(ordered)
    return {hit.id: float(n - i) for i, hit in enumerate(ordered)}


def score_run(run: Run, qrels: Qrels, metrics: list[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(aggregate, per_query) for each metric name ('ndcg@10', 'map@100', 'recall@100', 'p@10', 'mrr').

    Every query in `qrels` counts: an absent or empty result list scores 0. Queries of the run
    that have no judgements are skipped (as trec_eval does); `unjudged_queries` lists them.
    A query whose judgements are all grade 0 is kept and scores 0. Aggregates are plain means.
    """
    parsed = [parse_metric(m) for m in metrics]
    judged = {q: dict(docs) for q, docs in qrels.items() if docs}
    per_query: dict[str, dict[str, float]] = {q: {} for q in judged}
    if not judged or not parsed:
        return {m.name: 0.0 for m in parsed}, per_query

    # One pytrec_eval pass for the cutoff metrics, one more per distinct MRR cutoff (trec_eval's
    # recip_rank has no cutoff; MRR@k is the reciprocal rank over the top k only, as in BEIR).
    by_depth: dict[int | None, list[Metric]] = {}
    for metric in parsed:
        depth = metric.cutoff if metric.family == "mrr" else None
        by_depth.setdefault(depth, []).append(metric)

    for depth, group in by_depth.items():
        measures = set()
        for metric in group:
            if metric.family == "mrr":
                measures.add("recip_rank")
            else:
                measures.add(f"{_FAMILIES[metric.family][0]}.{metric.cutoff}")
        run_scores = {q: _strict_scores(run.get(q, []), depth) for q in judged}
        evaluated = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(run_scores)
        for qid in judged:
            values = evaluated.get(qid, {})
            for metric in group:
                if metric.family == "mrr":
                    key = "recip_rank"
                else:
                    key = f"{_FAMILIES[metric.family][1]}{metric.cutoff}"
                per_query[qid][metric.name] = float(values.get(key, 0.0))

    aggregate = {m.name: sum(per_query[q][m.name] for q in judged) / len(judged) for m in parsed}
    return aggregate, per_query


def unjudged_queries(run: Run, qrels: Qrels) -> list[str]:
    """Query ids the run answers but the qrels do not judge (they are not scored)."""
    return sorted(q for q in run if not qrels.get(q))
