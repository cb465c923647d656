"""Scores of generated answers: answer quality plus what the chunk KV cache cost or saved.

Each query's generation is summarised as a record (a mapping) with
    text               the answer
    ttft_s             time to first token, seconds
    recomputed_tokens  context tokens whose KV was recomputed (not reused from the cache)
    context_tokens     context tokens in the prompt
    recompute_share    optional: the generator's own share of context rows recomputed (weighted by
                       layers); else recomputed_tokens / context_tokens
    cache_hits         optional: chunks found in the KV cache, out of len(chunk_ids)
    kl                 optional: KL(full prefill || this mode) of the first answer token's distribution
    agreement          optional: share of answer tokens equal to the full-prefill answer's
    choice_agreement   optional, closed form: 1.0 when this mode picks the reference's choice
    loglik_gap         optional, closed form: largest |log-likelihood difference| of a choice vs the reference
and scored into the same (aggregate, per_query) shape as retrieval, so one results.json
holds both and the leaderboard can plot quality against TTFT.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from eval.answers import score_answers

Scores = tuple[dict[str, float], dict[str, dict[str, float]]]
_COMPARED = ("kl", "agreement", "choice_agreement", "loglik_gap")  # against a reference mode, where measured


def cache_metrics(records: Mapping[str, Mapping[str, Any]]) -> Scores:
    """Per query: ttft_s, recompute_share, chunk_hit_rate and the reference comparisons where measured; means +
    TTFT p50/p90."""
    per_query: dict[str, dict[str, float]] = {}
    for qid, record in records.items():
        values: dict[str, float] = {}
        if record.get("ttft_s") is not None:
            values["ttft_s"] = float(record["ttft_s"])
        context = record.get("context_tokens") or 0
        if record.get("recompute_share") is not None:
            values["recompute_share"] = float(record["recompute_share"])
        elif context:
            values["recompute_share"] = float(record.get("recomputed_tokens", 0)) / float(context)
        if record.get("cache_hits") is not None and record.get("chunk_ids"):
            values["chunk_hit_rate"] = float(record["cache_hits"]) / len(record["chunk_ids"])
        for key in _COMPARED:
            if record.get(key) is not None:
                values[key] = float(record[key])
        per_query[qid] = values
    aggregate: dict[str, float] = {}
    for key in ("ttft_s", "recompute_share", "chunk_hit_rate", *_COMPARED):
        column = [v[key] for v in per_query.values() if key in v]
        if column:
            aggregate[key] = float(np.mean(column))
    ttfts = [v["ttft_s"] for v in per_query.values() if "ttft_s" in v]
    if ttfts:
        aggregate["ttft_p50_s"] = float(np.percentile(ttfts, 50))
        aggregate["ttft_p90_s"] = float(np.percentile(ttfts, 90))
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


def first_token_kl(reference_logits: Any, logits: Any) -> float:
    """KL(reference || other) between the softmaxes of two first-token logit vectors [V], in nats."""
    p = _log_softmax(np.asarray(reference_logits, dtype=np.float64))
    q = _log_softmax(np.asarray(logits, dtype=np.float64))
    return max(0.0, float(np.sum(np.exp(p) * (p - q))))  # rounding can leave -1e-12 for equal inputs


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())
