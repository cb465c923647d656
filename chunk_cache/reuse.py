"""Prefill an assembled prompt under one reuse mode (`cache.mode`).

full    every row computed (the reference).
prefix  exact-prefix reuse only: the shared prefix and the leading chunks whose KV was computed
        behind exactly the tokens now before them; everything after is computed (vLLM/SGLang).
naive   every cached chunk reused as rotated; only separators, uncached chunks and the question run.
ape     APE: chunks share positions after the prefix; the question attends to them at temperature T
        and their total weight is rescaled by S (log-sum-exp merge); nothing recomputed.
blend   CacheBlend: the first `full_layers` layers recompute every non-exact row; at the next layer
        the reused rows are ranked by how far their fresh V deviates from the stored V, weighted by
        the attention the question rows pay them; the top `ratio` and every computed row run
        through the remaining layers.
craft   Cache-Craft: each chunk recomputes a fraction alpha * CCI * (1 - beta) of its tokens, those
        that attended most outside themselves when cached; beta is the share of the chunk's present
        context that it was encoded with (the shared prefix).
Recomputed rows always attend with the exact causal mask (key position <= query position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chunk_cache.assembly import CHUNK, Layout, Segment

MODES = ["full", "prefix", "naive", "ape", "blend", "craft"]


@dataclass(frozen=True)
class ReuseSettings:
    mode: str = "blend"
    ratio: float = 0.15
    full_layers: int = 2
    ape_temperature: float = 0.9
    ape_scale: float = 0.9
    craft_alpha: float = 1.0


@dataclass
class Prefilled:
    logits: torch.Tensor  # [V] fp32, next-token logits after the last prompt row
    recomputed_context: int  # chunk rows that ran through the upper layers (computed or re-computed)
    context: int  # chunk rows in the prompt


def prefill(model, layout: Layout, cache, segments: list[Segment], settings: ReuseSettings) -> Prefilled:
    """Compute what the mode requires so that `cache` holds the whole prompt; return the last logits."""
    chunk_rows = _chunk_rows(layout, segments)
    model.ape = None
    if settings.mode == "blend":
        logits, rows = _blend(model, layout, cache, settings)
        return Prefilled(logits, int((rows & chunk_rows).sum()), int(chunk_rows.sum()))
    rows = ~layout.reused
    if settings.mode == "craft":
        rows = rows | _craft_rows(layout, segments, settings.craft_alpha)
    if settings.mode == "ape":
        model.ape = (settings.ape_temperature, settings.ape_scale)
    idx = rows.nonzero()[:, 0]
    logits = model.forward(layout.token_ids[idx][None].to(model.device), layout.positions[idx][None].to(model.device),
                           cache, idx.to(model.device))
    return Prefilled(logits[0, -1], int((rows & chunk_rows).sum()), int(chunk_rows.sum()))


def _chunk_rows(layout: Layout, segments: list[Segment]) -> torch.Tensor:
    rows = torch.zeros(layout.size, dtype=torch.bool)
    for seg, (s, e) in zip(segments, layout.spans):
        if seg.kind == CHUNK:
            rows[s:e] = True
    return rows


def _blend(model, layout: Layout, cache, settings: ReuseSettings):
    """CacheBlend after `full_layers` full layers; returns (logits, rows recomputed).

    At the check layer each reused row scores its V deviation times the attention the question
    rows pay it: a stale row that nothing downstream reads matters less than one the answer reads.
    """
    device = model.device
    active = ~layout.exact  # rows the full layers compute: everything not known to be exact
    idx = active.nonzero()[:, 0]
    slots = idx.to(device)
    positions = layout.positions[idx][None].to(device)
    cache.positions[0, slots] = positions[0]
    x = model.embed_tokens(layout.token_ids[idx][None].to(device))
    rope = model.rope(positions)
    masks = model.masks_for(cache, positions)
    n_layers = model.args.n_layers
    check = min(settings.full_layers, n_layers)
    for i in range(check):
        x = model.layer(i, x, positions, slots, cache, rope, masks)
    candidates = (layout.reused & ~layout.exact)[idx]  # reused rows among `idx`
    keep = ~candidates  # computed rows (separators, uncached chunks, question) always run
    if check < n_layers:
        q, k, v = model.qkv(check, x, rope)
        n_pick = math.ceil(settings.ratio * int(candidates.sum()))
        stored_v = cache.values[check, :, :, slots]  # [1, H_kv, S, D] before the fresh rows overwrite it
        cache.keys[check, :, :, slots] = k
        cache.values[check, :, :, slots] = v
        if n_pick:
            deviation = (v.float() - stored_v.float()).pow(2).sum(dim=(0, 1, 3))  # [S]
            tail = idx > int(idx[candidates].max())  # the rows after the last reused one: the question
            read = _attention_received(model, check, q[:, :, tail.to(device)], positions[:, tail.to(device)], cache)
            score = (deviation * read[slots]).cpu()
            score[~candidates] = -1.0
            keep[score.topk(n_pick).indices] = True
        sel = keep.nonzero()[:, 0].to(device)
        x, positions, slots, rope = x[:, sel], positions[:, sel], slots[sel], (rope[0][:, :, sel], rope[1][:, :, sel])
        masks = model.masks_for(cache, positions)
        x = model.finish(check, x, q[:, :, sel], cache, positions, masks)
        for i in range(check + 1, n_layers):
            x = model.layer(i, x, positions, slots, cache, rope, masks)
    rows = torch.zeros(layout.size, dtype=torch.bool)
    rows[idx[keep]] = True
    return model.logits(x[:, -1:])[0, -1], rows


def _attention_received(model, layer: int, q: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """Causal attention weight each cache slot gets from queries q [1, H, S, D] at `positions` [1, S],
    summed over heads and queries; returns [T] fp32 (T = cache.length)."""
    keys = cache.keys[layer, 0, :, : cache.length]  # [H_kv, T, D]
    keys = keys.repeat_interleave(q.shape[1] // keys.shape[0], dim=0).float()  # [H, T, D]
    scores = (q[0].float() @ keys.transpose(1, 2)) * model.softmax_scale  # [H, S, T]
    key_positions = cache.positions[0, : cache.length]
    hidden = (key_positions < 0)[None, :] | (key_positions[None, :] > positions[0][:, None])  # [S, T]
    return scores.masked_fill(hidden[None], float("-inf")).softmax(-1).sum(dim=(0, 1))


def _craft_rows(layout: Layout, segments: list[Segment], alpha: float) -> torch.Tensor:
    """Rows Cache-Craft recomputes: per reused, non-exact chunk, the top CFO share by inter-attention."""
    rows = torch.zeros(layout.size, dtype=torch.bool)
    prefix_rows = 0
    for index, (seg, (s, e)) in enumerate(zip(segments, layout.spans)):
        if seg.kind != CHUNK:
            if s == 0 and e > 0:
                prefix_rows = e
            continue
        if not layout.reused[s] or layout.exact[s]:
            continue
        stats = layout.extras.get(index, {})
        # An entry stored without statistics (by prefix mode) counts as fully context-dependent.
        cci = float(stats["cci"]) if "cci" in stats else 1.0
        inter = stats["inter"] if "inter" in stats else torch.zeros(e - s)
        beta = prefix_rows / max(s, 1)  # share of the present context the chunk was encoded with
        cfo = min(1.0, max(0.0, alpha * cci * (1.0 - beta)))
        n = math.ceil(cfo * (e - s))
        if n:
            rows[s + inter.topk(n).indices] = True
    return rows

