"""Scores of generated answers: answer quality plus what the chunk KV cache cost or saved.

Each query's generation is summarised as a record (a mapping) with
    text               the answer
    ttft_s             time to first token, seconds
    recomputed_tokens  context tokens whose KV was recomputed (not reused from the cache)
    context_tokens     context tokens in the prompt
    kl                 optional: KL(full prefill || this mode) of the first answer token's distribution
    agreement          optional: share of answer tokens equal to the full-prefill answer's
and scored into the same (aggregate, per_query) shape as retrieval, so one results.json
holds both and the leaderboard can plot quality against TTFT.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from eval.answers import score_answers

Scores = tuple[dict[str, float], dict[str, dict[str, float]]]


def cache_metrics(records: Mapping[str, Mapping[str, Any]]) -> Scores:
    """Per query: ttft_s, recompute_share, and kl / agreement where measured; means + TTFT p50/p95."""
    per_query: dict[str, dict[str, float]] = {}
    for qid, record in records.items():
        values: dict[str, float] = {}
        if record.get("ttft_s") is not None:
            values["ttft_s"] = float(record["ttft_s"])
        context = record.get("context_tokens") or 0
        if context:
            values["recompute_share"] = float(record.get("recomputed_tokens", 0)) / float(context)
        for key in ("kl", "agreement"):
            if record.get(key) is not None:
                values[key] = float(record[key])
        per_query[qid] = values
    aggregate: dict[str, float] = {}
    for key in ("ttft_s", "recompute_share", "kl", "agreement"):
        column = [v[key] for v in per_query.values() if key in v]
        if column:
            aggregate[key] = float(np.mean(column))
    ttfts = [v["ttft_s"] for v in per_query.values() if "ttft_s" in v]
    if ttfts:
        aggregate["ttft_p50_s"] = float(np.percentile(ttfts, 50))
        aggregate["ttft_p95_s"] = float(np.percentile(ttfts, 95))
    return aggregate, per_query


def score_generation(records: Mapping[str, Mapping[str, Any]], golds: Mapping[str, list[str]],
                     answer_metrics: Iterable[str] = ("em", "f1")) -> Scores:
    """Answer metrics against the gold answers merged with the cache metrics, per query."""
    predictions = {qid: str(record.get("text", "")) for qid, record in records.items()}
    return merge_scores(score_answers(predictions, dict(golds), answer_metrics), cache_metrics(records))


def merge_scores(*scores: Scores) -> Scores:
    """Fold several (aggregate, per_query) pairs into one; later metric names win on a clash."""
    aggregate: dict[str, float] = {}
    per_query: dict[str, dict[str, float]] = {}
    for agg, pq in scores:
        aggregate.update(agg)
        for qid, values in pq.items():
            per_query.setdefault(qid, {}).update(values)
    return aggregate, per_query
