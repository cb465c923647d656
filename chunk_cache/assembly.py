"""Lay stored chunk KV out in a new prompt: rows, RoPE positions, and which rows are reused or exact.

A prompt is a list of segments whose token ids are concatenated as they are: the joined text
is never re-tokenised, so a chunk's ids in the prompt are exactly the ids its KV was computed for.
Only a chunk's own rows are stored; its keys are rotated from the positions they were computed at
to the positions the chunk now occupies (chunk_cache.rope), layer by layer as the rows are copied
in (chunk_cache.upload). In parallel (APE) layout every group — a chunk with its title and
separator — starts right after the shared head. Under LongRoPE (Phi-3) no entry is reused, and
none computed, in a prompt past the factor switch: every stored entry stays in the short-factor regime.

Words: the *head* is the prompt's shared start (chat template, system prompt, "Documents:"); a chunk's
*context* is what its rows were computed behind (chunk_cache.keys); *prefix* names only the mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chunk_cache.store import ChunkKV
from chunk_cache.upload import LayerUploads, fill
from ragkit.errors import ConfigError

HEAD, TITLE, CHUNK, GAP, QUESTION = "head", "title", "chunk", "gap", "question"  # a TITLE precedes its CHUNK


@dataclass(frozen=True)
class Segment:
    """A run of prompt tokens: the shared head, a chunk's title, one retrieved chunk, a separator, or the
    question."""

    kind: str
    token_ids: tuple[int, ...]


@dataclass
class Layout:
    """Where every prompt row sits: cache slot = row index; `positions` its RoPE position.

    `reused` rows were filled from stored KV; `exact` reused rows equal what a full prefill
    computes (the shared head and chunks that sit behind the very tokens they were encoded
    behind); `group` is the APE group each row belongs to (-1: none; None outside APE);
    `uploaded` the device copies made of entries that were in host memory (chunk_cache.upload).
    """

    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    spans: list[tuple[int, int]]  # per segment: rows [start, end); (0, 0) for a segment left out
    reused: torch.Tensor  # [N] bool
    exact: torch.Tensor  # [N] bool
    group: torch.Tensor | None = None  # [N] int64
    uploaded: dict[int, ChunkKV] = field(default_factory=dict)  # segment index -> device copy of its entry

    @property
    def size(self) -> int:
        return int(self.token_ids.shape[0])


def assemble(model, segments: list[Segment], entries: dict[int, ChunkKV], exact: set[int], extra: int,
             parallel: bool = False, uploads: LayerUploads | None = None):
    """Lay the prompt out and fill the cache rows of every segment that has an entry.

    entries: segment index -> stored KV (the head, chunks); exact: the indices whose KV is exact
    here. parallel (APE): each group (title, chunk, separator) starts right after the head, and
    the question follows the longest group. Returns (Layout, KVCache with room for `extra` more rows);
    layer i of the cache is in place once `cache.ready(i)` returns (chunk_cache.upload).
    """
    spans, positions, ids, groups = [], [], [], []
    row = position = head_end = question_start = 0
    group = -1
    for index, seg in enumerate(segments):
        n = len(seg.token_ids)
        if parallel and (seg.kind == TITLE or (seg.kind == CHUNK and segments[index - 1].kind != TITLE)):
            group += 1  # a new group restarts at the shared positions
            position = head_end
        if parallel and seg.kind == QUESTION:
            position, group = question_start, -1
        spans.append((row, row + n))
        positions.append(torch.arange(position, position + n))
        ids.extend(seg.token_ids)
        groups.append(torch.full((n,), group if seg.kind != HEAD else -1))
        row += n
        position += n
        question_start = max(question_start, position)
        if seg.kind == HEAD:
            head_end = position
    layout = Layout(token_ids=torch.tensor(ids, dtype=torch.long), positions=torch.cat(positions),
                    spans=spans, reused=torch.zeros(row, dtype=torch.bool), exact=torch.zeros(row, dtype=torch.bool),
                    group=torch.cat(groups) if parallel else None)
    switch = getattr(model, "rope_switch", None)
    if entries and switch is not None and position > switch:
        raise ConfigError("generator.mode", f"this model's LongRoPE uses other RoPE factors once a prompt passes "
                          f"{switch} positions, so KV stored for shorter prompts is wrong in this {position}-position "
                          "prompt (and KV computed here would be wrong in shorter ones)",
                          allowed=["full (for prompts this long)"])
    cache = model.new_cache(1, row + extra)
    shift = torch.zeros(row, dtype=torch.long)  # new position - stored position, per row
    for index, entry in entries.items():
        s, e = spans[index]
        shift[s:e] = int(layout.positions[s]) - entry.start
        layout.reused[s:e] = True
        layout.exact[s:e] = index in exact
    cache.positions[0, :row] = torch.where(layout.reused, layout.positions, -1).to(model.device)
    cache.length = row
    if parallel:
        cache.context = torch.cat([layout.group >= 0, torch.zeros(extra, dtype=torch.bool)]).to(model.device)  # APE mask
    layout.uploaded = fill(model, cache, {index: spans[index] for index in entries}, entries, shift, uploads)
    return layout, cache
