"""Deterministic top-k selection: score descending, exact ties broken by chunk id ascending.

Every retriever ends in this function so that a saved index, an incrementally updated one
and a from-scratch build return the same ranking whatever their internal slot order.
"""

from __future__ import annotations

import numpy as np


def id_ranks(ids: list[str]) -> np.ndarray:
    """Position of each slot's id in sorted id order: a cheap integer tie-break key."""
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[order] = np.arange(len(ids))
    return ranks


def top_k(scores: np.ndarray, k: int, id_rank: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
    """Slots of the k best `scores` (over `candidates`, default all), best first.

    scores: (n_slots,) float; candidates: slot numbers allowed to appear.
    """
    if candidates is None:
        candidates = np.arange(len(scores))
    if len(candidates) > k > 0:
        cand_scores = scores[candidates]
        kth = np.partition(cand_scores, len(cand_scores) - k)[len(cand_scores) - k]
        candidates = candidates[cand_scores >= kth]  # keeps every slot tied with the k-th
    order = np.lexsort((id_rank[candidates], -scores[candidates]))
    return candidates[order[:k]]
