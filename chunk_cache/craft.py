"""Cache-Craft's quantities (Agarwal et al., SIGMOD 2025): a stored variant's context statistics, and
how much of its stored context is still in front of it now.

With a_{k,l} the head-averaged attention from token k to token l, for chunk C stored behind the
groups G (each earlier chunk, and the shared head without its first, attention-sink token):

    inter(C, G) = sum_{k in C, l in G} a_{k,l}          intra(C) = sum_{k, l in C, l <= k} a_{k,l}
    a_bar = sum_G inter(C, G) / (|C| |G|)               b_bar = intra(C) / (|C| (|C| + 1) / 2)
    CCI = a_bar / (a_bar + b_bar) = sigmoid(ln(a_bar / b_bar))      in (0, 1): 0 self-contained

(the paper's sigmoid(a_bar / b_bar) of two non-negative means never falls below 0.5; the log-ratio
spans the whole range). Statistics are averaged over STAT_LAYERS evenly spaced layers, which keeps
their cost a few percent of the chunk's own prefill also when it is computed inside a long prompt.

Stored with the variant: per token its attention outside the chunk (which tokens to recompute), the
CCI, and inter(C, C_j) per earlier chunk C_j (its `context`). At reuse behind the chunks S_new:

    beta  = sum_{j in S_old and S_new} inter(C, C_j) / sum_{j in S_old} inter(C, C_j)
    gamma = discordant pairs among the shared chunks' orders / C(m, 2)      (Kendall-tau distance)
    beta' = beta (1 - gamma)

A variant stored behind no chunk has beta' = 1 where it again has none before it, else 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STAT_LAYERS = 3


def stat_layers(n_layers: int) -> list[int]:
    """STAT_LAYERS evenly spaced layers, the first and last included."""
    if n_layers <= STAT_LAYERS:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (STAT_LAYERS - 1)) for i in range(STAT_LAYERS)})


@dataclass
class ChunkStatistics:
    """Accumulates one chunk's attention statistics over the sampled layers of one forward."""

    rows: tuple[int, int]  # the chunk's prompt rows [start, end)
    groups: list[tuple[int, int]]  # rows of each outside group: the head (sink excluded), then earlier chunks
    inter: torch.Tensor = field(init=False)  # [|C|] attention each token paid outside the chunk
    by_group: torch.Tensor = field(init=False)  # [groups]
    intra: float = 0.0
    layers: int = 0

    def __post_init__(self) -> None:
        self.inter = torch.zeros(self.rows[1] - self.rows[0])
        self.by_group = torch.zeros(len(self.groups))

    def add(self, probs: torch.Tensor) -> None:
        """probs [|C|, T]: the chunk rows' head-averaged attention over prompt rows 0..T-1 at one layer."""
        start, end = self.rows
        for g, (s, e) in enumerate(self.groups):
            mass = probs[:, s:e].sum(-1)
            self.inter += mass.cpu()
            self.by_group[g] += float(mass.sum())
        self.intra += float(probs[:, start:end].sum())
        self.layers += 1

    def extras(self) -> dict[str, torch.Tensor]:
        """What the stored variant carries: per-token inter-attention, CCI, and inter per earlier chunk."""
        n, layers = self.rows[1] - self.rows[0], max(1, self.layers)
        sizes = torch.tensor([max(1, e - s) for s, e in self.groups], dtype=torch.float32)
        a_bar = float((self.by_group / (n * sizes)).sum()) / layers
        b_bar = self.intra / (n * (n + 1) / 2) / layers
        cci = a_bar / (a_bar + b_bar) if a_bar + b_bar > 0 else 0.0
        return {"inter": self.inter / layers, "cci": torch.tensor([cci]), "inter_by_chunk": self.by_group[1:] / layers}


def overlap(stored_context: tuple[str, ...], inter_by_chunk: torch.Tensor | None, now_before: list[str]) -> float:
    """beta' of a variant stored behind the chunks `stored_context` (hashes, in order), now behind `now_before`."""
    if not stored_context:
        return 0.0 if now_before else 1.0
    weights = inter_by_chunk if inter_by_chunk is not None and len(inter_by_chunk) == len(stored_context) \
        else torch.ones(len(stored_context))
    present = set(now_before)
    total = float(weights.sum())
    beta = sum(float(w) for h, w in zip(stored_context, weights) if h in present) / total if total > 0 else 0.0
    shared = [h for h in stored_context if h in present]
    return beta * (1.0 - _order_distance(shared, [h for h in now_before if h in set(shared)]))


def _order_distance(old: list[str], new: list[str]) -> float:
    """Kendall-tau distance between two orders of the same items: discordant pairs / all pairs."""
    m = len(old)
    if m < 2:
        return 0.0
    rank = {h: i for i, h in enumerate(new)}
    order = [rank[h] for h in old]
    discordant = sum(1 for i in range(m) for j in range(i + 1, m) if order[i] > order[j])
    return discordant / (m * (m - 1) / 2)


def attention_probs(q: torch.Tensor, keys: torch.Tensor, key_positions: torch.Tensor,
                    query_positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-averaged causal attention probabilities [S, T] of q [1, H, S, D] over keys [1, H_kv, T, D]
    whose positions are key_positions [T] (-1: not visible), for queries at query_positions [S]."""
    groups = q.shape[1] // keys.shape[1]
    scores = (q.float() @ keys.float().repeat_interleave(groups, dim=1).transpose(-1, -2)) * scale
    visible = (key_positions[None, :] >= 0) & (key_positions[None, :] <= query_positions[:, None])
    return scores.masked_fill(~visible[None, None], float("-inf")).softmax(-1).mean(dim=1)[0]
