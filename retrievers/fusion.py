"""Fusion of any number of ranked lists: reciprocal rank fusion and weighted score fusion.

RRF (Cormack et al., 2009) as Pyserini and FlashRAG apply it: score(d) = sum over lists of
w / (rrf_k + rank(d)), rrf_k = 60; a list that misses d adds nothing. Weighted fusion first
puts each list's scores on one scale (min-max to [0, 1] or z-score), gives a missing document
that list's lowest normalised score, and adds weight * score. Ties are broken by id.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ragkit.errors import ConfigError
from ragkit.types import Hit, rank_hits

METHODS = ["rrf", "weighted"]
NORMALIZATIONS = ["minmax", "zscore"]


def rrf(lists: Sequence[list[Hit]], k: int, rrf_k: int = 60, weights: Sequence[float] | None = None) -> list[Hit]:
    weights = weights or [1.0] * len(lists)
    fused: dict[str, float] = {}
    for hits, weight in zip(lists, weights):
        for hit in hits:
            fused[hit.id] = fused.get(hit.id, 0.0) + weight / (rrf_k + hit.rank)
    return rank_hits(fused, k)


def normalize(scores: np.ndarray, method: str) -> np.ndarray:
    if method == "minmax":
        span = scores.max() - scores.min()
        return (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
    std = scores.std()
    return (scores - scores.mean()) / std if std > 0 else np.zeros_like(scores)


def weighted(lists: Sequence[list[Hit]], k: int, weights: Sequence[float] | None = None,
             normalization: str = "minmax") -> list[Hit]:
    weights = weights or [1.0] * len(lists)
    per_list = []
    for hits in lists:
        values = normalize(np.array([h.score for h in hits], dtype=np.float64), normalization) if hits else []
        per_list.append(({h.id: float(v) for h, v in zip(hits, values)}, min(values, default=0.0)))
    fused = {}
    for doc_id in {h.id for hits in lists for h in hits}:
        fused[doc_id] = sum(w * scores.get(doc_id, floor) for (scores, floor), w in zip(per_list, weights))
    return rank_hits(fused, k)


def fuse(rankings: list[list[list[Hit]]], method: str, k: int, rrf_k: int = 60,
         weights: Sequence[float] | None = None, normalization: str = "minmax") -> list[list[Hit]]:
    """Fuse per-retriever result lists: rankings[retriever][query] -> hits; returns [query] -> hits."""
    if method not in METHODS:
        raise ConfigError("retrieval.fusion", f"unknown value {method!r}", allowed=METHODS)
    if normalization not in NORMALIZATIONS:
        raise ConfigError("retrieval.normalization", f"unknown value {normalization!r}", allowed=NORMALIZATIONS)
    if weights is not None and len(weights) != len(rankings):
        raise ConfigError("retrieval.weights", f"needs one weight per retriever ({len(rankings)}), got {len(weights)}")
    if len({len(r) for r in rankings}) > 1:
        raise ValueError("every retriever must return one list per query")
    per_query = zip(*rankings)
    if method == "rrf":
        return [rrf(lists, k, rrf_k, weights) for lists in per_query]
    return [weighted(lists, k, weights, normalization) for lists in per_query]
