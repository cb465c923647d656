"""Encode chunks once behind the shared prefix, and lay cached chunks out in a new prompt.

A prompt is a list of segments whose token ids are concatenated as they are: the joined text
is never re-tokenised, so a chunk's ids in the prompt are exactly the ids its KV was computed for.
Only the chunk's own rows are stored; at query time its keys are rotated from the positions
they were computed at to the positions the chunk now occupies. The decoder is passed in
(duck-typed: `generators.model.Decoder`), so this module stays free of any model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chunk_cache.rope import rerotate
from chunk_cache.store import ChunkKV
from ragkit.types import Chunk

PREFIX, CHUNK, GAP, QUESTION = "prefix", "chunk", "gap", "question"


@dataclass(frozen=True)
class Segment:
    """A run of prompt tokens: the shared prefix, one retrieved chunk, a separator, or the question."""

    kind: str
    token_ids: tuple[int, ...]
    chunk: Chunk | None = None


@dataclass
class Layout:
    """Where every prompt row sits: cache slot = row index; `positions` its RoPE position.

    `reused` rows were filled from stored KV; `exact` reused rows equal what a full prefill
    computes (the shared prefix and chunks that sit behind the very prefix they were encoded
    behind); `context` marks APE's parallel contexts (None outside APE).
    """

    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    spans: list[tuple[int, int]]  # per segment: rows [start, end); (0, 0) for a segment left out
    reused: torch.Tensor  # [N] bool
    exact: torch.Tensor  # [N] bool
    context: torch.Tensor | None = None  # [N] bool
    extras: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # segment -> stored statistics

    @property
    def size(self) -> int:
        return int(self.token_ids.shape[0])


def encode_chunk(model, prefix: ChunkKV, chunk_ids: list[int] | tuple[int, ...]) -> ChunkKV:
    """The chunk's KV computed behind the cached shared prefix (rows |P|.. only), plus Cache-Craft's
    statistics: per token, the attention it paid outside itself (non-sink prefix tokens), and the
    chunk's context impact CCI = sigmoid(mean inter-attention / mean intra-attention)."""
    n_prefix, n_chunk = prefix.keys.shape[2], len(chunk_ids)
    cache = model.new_cache(1, n_prefix + n_chunk)
    cache.keys[:, 0, :, :n_prefix] = prefix.keys.to(model.dtype)
    cache.values[:, 0, :, :n_prefix] = prefix.values.to(model.dtype)
    cache.positions[0, : n_prefix + n_chunk] = torch.arange(n_prefix + n_chunk)
    cache.length = n_prefix + n_chunk
    positions = torch.arange(n_prefix, n_prefix + n_chunk, device=model.device)[None]
    slots = positions[0]
    rope = model.rope(positions)
    x = model.embed_tokens(torch.tensor([chunk_ids], device=model.device))
    inter = torch.zeros(n_chunk)
    ratio_sum = 0.0
    causal = torch.ones(n_chunk, n_prefix + n_chunk, dtype=torch.bool, device=model.device).tril(n_prefix)
    masks = model.masks_for(cache, positions)
    for i in range(model.args.n_layers):
        q, k, v = model.qkv(i, x, rope)
        cache.keys[i, :, :, slots] = k
        cache.values[i, :, :, slots] = v
        probs = _attention_probs(q, cache.keys[i, :, :, : cache.length], causal, model.softmax_scale)  # [T, P+T]
        outside = probs[:, 1:n_prefix].sum(-1)  # the first token is the attention sink, not context
        inside = probs[:, n_prefix:].sum()
        inter += outside.cpu()
        mean_inter = outside.sum() / (n_chunk * max(n_prefix - 1, 1))
        mean_intra = inside / (n_chunk * (n_chunk + 1) / 2)
        ratio_sum += float(mean_inter / mean_intra)
        x = model.finish(i, x, q, cache, positions, masks)
    cci = torch.sigmoid(torch.tensor([ratio_sum / model.args.n_layers]))
    return ChunkKV(keys=cache.keys[:, 0, :, n_prefix:].clone(), values=cache.values[:, 0, :, n_prefix:].clone(),
                   start=n_prefix, extras={"inter": inter / model.args.n_layers, "cci": cci})


def encode_prefix(model, prefix_ids: list[int] | tuple[int, ...]) -> ChunkKV:
    """The shared prefix's own KV (positions 0..|P|-1)."""
    n = len(prefix_ids)
    cache = model.new_cache(1, n)
    positions = torch.arange(n, device=model.device)
    model.forward(torch.tensor([prefix_ids], device=model.device), positions[None], cache, positions)
    return ChunkKV(keys=cache.keys[:, 0].clone(), values=cache.values[:, 0].clone(), start=0, extras={})


def _attention_probs(q, keys, mask, scale) -> torch.Tensor:
    """Head-averaged attention probabilities [S, T] of q [1, H, S, D] over keys [1, H_kv, T, D]."""
    groups = q.shape[1] // keys.shape[1]
    scores = (q.float() @ keys.float().repeat_interleave(groups, dim=1).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).mean(dim=1)[0]


def assemble(model, segments: list[Segment], entries: dict[int, ChunkKV], exact: set[int], extra: int,
             parallel: bool = False):
    """Lay the prompt out and fill the cache rows of every segment that has an entry.

    entries: segment index -> stored KV (the prefix, chunks); exact: the indices whose KV is exact
    here. parallel (APE): every chunk starts right after the prefix, separators are left out, and
    the question follows the longest chunk. Returns (Layout, KVCache with room for `extra` more rows).
    """
    spans, positions, ids = [], [], []
    row = 0
    position = 0
    prefix_end = 0
    longest = 0
    for seg in segments:
        if parallel and seg.kind == GAP:
            spans.append((0, 0))
            continue
        n = len(seg.token_ids)
        if parallel and seg.kind == CHUNK:
            start_pos = prefix_end
            longest = max(longest, n)
        elif parallel and seg.kind == QUESTION:
            start_pos = max(position, prefix_end + longest)
        else:
            start_pos = position
        spans.append((row, row + n))
        positions.append(torch.arange(start_pos, start_pos + n))
        ids.extend(seg.token_ids)
        row += n
        position = start_pos + n
        if seg.kind == PREFIX:
            prefix_end = position
    layout = Layout(token_ids=torch.tensor(ids, dtype=torch.long), positions=torch.cat(positions),
                    spans=spans, reused=torch.zeros(row, dtype=torch.bool), exact=torch.zeros(row, dtype=torch.bool))
    if parallel:
        layout.context = torch.zeros(row, dtype=torch.bool)
        for seg, (s, e) in zip(segments, spans):
            if seg.kind == CHUNK:
                layout.context[s:e] = True
    cache = model.new_cache(1, row + extra)
    for index, entry in entries.items():
        s, e = spans[index]
        new_start = int(layout.positions[s])
        keys = rerotate(entry.keys.to(model.device), new_start - entry.start, model.inv_freq)
        cache.keys[:, 0, :, s:e] = keys.to(model.dtype)
        cache.values[:, 0, :, s:e] = entry.values.to(device=model.device, dtype=model.dtype)
        layout.reused[s:e] = True
        layout.exact[s:e] = index in exact
        layout.extras[index] = entry.extras
    cache.positions[0, :row] = torch.where(layout.reused, layout.positions, -1).to(model.device)
    cache.length = row
    if parallel:
        cache.context = torch.cat([layout.context, torch.zeros(extra, dtype=torch.bool)]).to(model.device)
    return layout, cache
