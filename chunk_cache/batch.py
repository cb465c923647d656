"""Next-token logits of many prompts from one batched forward, each behind its own exactly reused rows.

A pointwise reranker asks one question of many chunks: prompt b is the head, chunk b, then the
question's rows. When every chunk's entry sits exactly where it was computed (behind the head alone),
only the question's rows are left, and all prompts compute them in one forward (the thin per-prompt
forwards pay each layer's fixed costs once per prompt). The batch cache is right-padded in two parts:

    slots [0, R)      prompt b's reused rows at [0, r_b), positions 0..r_b-1 (exact: as stored);
                      then empty slots (position -1)
    slots [R, R + C)  prompt b's computed rows at [R, R + c_b), positions r_b..r_b+c_b-1; then
                      padding rows at the positions after them

R and C are the longest reused and computed parts; the forward writes every computed slot (padding
rows included) before any layer reads it, so only the empty slots are zeroed. A row attends to slot t iff 0 <= position(t) <=
its own position (generators.model.visible), so no row sees an empty slot and no real row sees a
padding row (each sits after every real row of its prompt): prompt b's logits are those of its own
prefill up to float rounding. Without reuse (R = 0) every prompt starts at position 0 and the batch
is one causal prefill. `sub_batches` groups prompts of similar reused length, so the keys a batch
pads stay close to each prompt's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chunk_cache.decoder import ReuseDecoder
from chunk_cache.store import ChunkKV


@dataclass
class BatchPrompt:
    reused: list[ChunkKV]  # the prompt's leading entries, in order, each stored at the position it now has
    computed: tuple[int, ...]  # the token ids after them (at least one)

    @property
    def reused_rows(self) -> int:
        return sum(kv.keys.shape[2] for kv in self.reused)


def batchable(plan, rope_switch: int | None) -> BatchPrompt | None:
    """A chunk_cache.reuse.Plan as a batch prompt, or None when it needs its own prefill: misses to store,
    an entry that is not exact or not in the leading run, APE, or (LongRoPE) a prompt past the switch."""
    n = len(plan.entries)
    if plan.misses or plan.mode.parallel or set(plan.entries) != set(range(n)) or not plan.exact >= set(range(n)):
        return None
    reused = [plan.entries[i] for i in range(n)]
    row = 0
    for kv in reused:  # exact entries lie where they were computed; checked, since the batch does not rotate
        if kv.start != row:
            return None
        row += kv.keys.shape[2]
    computed = tuple(t for seg in plan.segments[n:] for t in seg.token_ids)
    if not computed or (rope_switch is not None and row + len(computed) > rope_switch):
        return None
    return BatchPrompt(reused, computed)


# Computed rows per forward: enough for the matmuls, few enough that a group pads its keys only to
# similar lengths. Probe (SciFact test queries 1-3, 20 candidates of 97-423 rows, SmolLM2, one CPU
# thread): groups of 10 or 7 by length took ~10% less time than one group of 20, groups of 5 ~9% less.
ROWS_PER_FORWARD = 256


def sub_batches(prompts: list[BatchPrompt], batch_size: int) -> list[list[int]]:
    """Indices of `prompts` in forward groups: sorted by length (reused rows, then computed), each group
    about ROWS_PER_FORWARD computed rows and at most `batch_size` prompts (a long uncached prompt: alone)."""
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i].reused_rows, len(prompts[i].computed)))
    rows = max((len(p.computed) for p in prompts), default=1)
    size = max(1, min(batch_size, math.ceil(ROWS_PER_FORWARD / rows)))
    return [order[i: i + size] for i in range(0, len(order), size)]


class BatchRoom:
    """Key and value memory kept from one batch to the next. A fresh buffer costs a page fault per page
    on first touch (on a CPU about as long as copying the entries in), and every slot is written before
    it is read, so the room is reused unzeroed; it grows to the largest batch seen."""

    def __init__(self):
        self.keys = self.values = None

    def take(self, like: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        size = math.prod(shape)
        if self.keys is None or self.keys.numel() < size or self.keys.dtype != like.dtype \
                or self.keys.device != like.device:
            self.keys, self.values = like.new_empty(size), like.new_empty(size)
        return self.keys[:size].view(shape), self.values[:size].view(shape)


def last_logits(model: ReuseDecoder, prompts: list[BatchPrompt], room: BatchRoom | None = None) -> torch.Tensor:
    """[B, V] fp32: each prompt's next-token logits after its last row, from one forward of all of them."""
    device = model.device
    reused = max(p.reused_rows for p in prompts)  # R
    computed = max(len(p.computed) for p in prompts)  # C
    cache = model.new_cache(len(prompts), 0)  # its keys and values: the room's, unzeroed (every slot is written)
    shape = (*cache.keys.shape[:3], reused + computed, cache.keys.shape[4])
    cache.keys, cache.values = (room or BatchRoom()).take(cache.keys, shape)
    cache.positions = cache.positions.new_full((len(prompts), reused + computed), -1)
    tokens = torch.zeros(len(prompts), computed, dtype=torch.long)  # padding rows: id 0, never seen
    positions = torch.empty(len(prompts), computed, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        row = 0
        for kv in prompt.reused:
            n = kv.keys.shape[2]
            cache.keys[:, b, :, row: row + n] = kv.keys.to(device)  # [L, H_kv, n, D]
            cache.values[:, b, :, row: row + n] = kv.values.to(device)
            cache.positions[b, row: row + n] = torch.arange(kv.start, kv.start + n)
            row += n
        cache.keys[:, b, :, row:reused] = 0  # empty slots: masked, but the kernel still multiplies them
        cache.values[:, b, :, row:reused] = 0
        tokens[b, : len(prompt.computed)] = torch.tensor(prompt.computed)
        positions[b] = torch.arange(row, row + computed)
    slots = torch.arange(reused, reused + computed, device=device)
    positions = positions.to(device)
    cache.positions[:, slots] = positions
    cache.length = reused + computed
    masks = model.masks_for(cache, positions, slots)  # one causal kernel when nothing is reused
    rope = model.rope(positions)
    x = model.embed_tokens(tokens.to(device))
    for i in range(model.args.n_layers):
        x = model.layer(i, x, positions, slots, cache, rope, masks)
    last = torch.tensor([len(p.computed) - 1 for p in prompts], device=device)
    return model.logits(x[torch.arange(len(prompts), device=device), last][:, None])[:, 0]
