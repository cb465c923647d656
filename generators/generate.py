"""Decoding after a prefill: greedy or sampled, stop tokens, token budget, streaming, batches.

The prefill (full or with reused KV) leaves the prompt in an explicit `KVCache`; decoding
appends one slot per step at the next position. A batch shares slots: row b's prompt may be
shorter, its padding slots carry position -1 and are never attended to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from generators.model import Decoder, KVCache


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


def pick(logits: torch.Tensor, sampling: Sampling, rng: torch.Generator | None) -> torch.Tensor:
    """Next token per row of logits [B, V]: argmax, or a nucleus sample at the temperature."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs.cpu(), 1, generator=rng)[:, 0].to(logits.device)


@torch.inference_mode()
def decode(model: Decoder, cache: KVCache, logits: torch.Tensor, next_positions: torch.Tensor,
           max_new_tokens: int, stop_ids: frozenset[int] = frozenset(), sampling: Sampling = Sampling(),
           on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Generate from the prefill's last logits [B, V]; next_positions [B] is each row's next position.

    Returns each row's tokens, without the stop token. on_token(row, token) streams them.
    """
    rng = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    batch = logits.shape[0]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    positions = next_positions.clone().to(model.device)
    for step in range(max_new_tokens):
        tokens = pick(logits, sampling, rng)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token in stop_ids:
                done[row] = True
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
        if all(done) or step == max_new_tokens - 1:
            break
        slots = torch.full((batch,), cache.length, device=model.device)
        logits = decode_step(model, tokens, positions, cache, slots)
        positions = positions + 1
    return outputs


def decode_step(model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor) -> torch.Tensor:
    """One token per row: row b's `tokens[b]` at `positions[b]` goes to its own cache slot `slots[b]`
    (rows of a batch may have different lengths); returns next-token logits [B, V]."""
    rows = torch.arange(tokens.shape[0], device=model.device)
    cache.ensure_capacity(int(slots.max()) + 1)
    cache.positions[rows, slots] = positions
    cache.length = max(cache.length, int(slots.max()) + 1)
    x = model.embed_tokens(tokens[:, None])
    rope = model.rope(positions[:, None])
    for i in range(model.args.n_layers):
        q, k, v = model.qkv(i, x, rope)
        cache.keys[i, rows, :, slots] = k[:, :, 0]
        cache.values[i, rows, :, slots] = v[:, :, 0]
        x = model.finish(i, x, q, cache, positions[:, None])
    return model.logits(x[:, -1])


@torch.inference_mode()
def teacher_forced_logits(model: Decoder, cache: KVCache, logits: torch.Tensor, next_position: int,
                          reference: list[int]) -> torch.Tensor:
    """Next-token logits [len(reference), V] after a prefill (its last logits [V]) and after each reference
    prefix. The forced rows are written past the prompt; a caller that decodes afterwards rewinds
    `cache.length`."""
    steps = [logits[None]]
    if len(reference) > 1:
        start = cache.length
        rows = torch.tensor([reference[:-1]], device=model.device)
        slots = torch.arange(start, start + rows.shape[1], device=model.device)
        steps.append(model.forward(rows, (next_position + slots - start)[None], cache, slots,
                                   logits_rows=slice(None))[0])
    return torch.cat(steps)
