"""The reuse modes: the one registry that config validation, the CLI, `--help` and the README read.

A mode is a lookup rule (which stored entries it may use) plus a selection rule (which reused rows
it recomputes). Rows that no entry covers (separators, titles, missed chunks, the question) are
always computed, and every computed row attends with the exact causal mask. A selection rule is
either static — the rows are known before layer 0 and run through every layer — or layer-wise —
every non-exact row runs the first layers, then at each check layer the reused rows are scored
from their fresh and stored K/V and only the best share keeps running (CacheBlend):

    full       everything computed (the reference); no lookups
    prefix     exact entries only (vLLM/SGLang prefix caching); everything after them computed
    naive      every entry reused as rotated; nothing reused is recomputed
    ape        APE: chunks at shared positions, question attention sharpened by T and scaled by S
    epic       EPIC: the first `epic_tokens` rows of every inexactly reused chunk, at every layer
    craft      Cache-Craft: per chunk a share alpha·CCI·(1-beta') of its rows, those that attended
               most outside the chunk when it was stored (chunk_cache.craft)
    blend      CacheBlend, ragkit's rule: after `full_layers` full layers keep the `ratio` share of
               reused rows with the largest V deviation x attention the question pays them
    cacheblend CacheBlend, the paper's rule: layer 0 full; at layer 1 keep 2·ratio by K+V deviation,
               at layer 2 filter those to `ratio` by the same score (gradual filtering)
    query      query-aware (ProphetKV, A³): a first pass runs only the question over the reused KV and
               scores every reused row by the attention it receives, fused over heads and layers,
               weighted by the row's stored inter-chunk attention (chunk_cache.probe); each chunk's
               first row and the `ratio` share (or `recompute_tokens` rows) scoring highest then run
               through every layer with the uncached rows, the question last

Adding a mode is one `Mode` entry here plus its rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ragkit.errors import ConfigError

if TYPE_CHECKING:  # config validation and --help read this registry without loading torch
    import torch

NONE, EXACT, ANY = "none", "exact", "any"  # what a mode may look up


@dataclass
class ReuseSettings:
    """The knobs of every mode: the [cache] section's reuse keys (ragkit.config.CacheConfig extends this)."""

    mode: str = "blend"
    ratio: float = 0.15
    full_layers: int = 2
    ape_temperature: float = 0.9
    ape_scale: float = 0.9
    craft_alpha: float = 1.0
    epic_tokens: int = 16
    recompute_tokens: int = 0  # query: a budget in rows instead of `ratio` (0: use `ratio`)


@dataclass
class Candidates:
    """What a static rule sees: per row of the prompt, whether it was reused and exact, and the spans of
    the reused, inexact chunks with their stored statistics and Cache-Craft overlap."""

    size: int
    reused_chunks: list["ReusedChunk"]
    # query-aware rules: per prompt row [N] fp32, the attention the question pays it in a first pass (lazy)
    question_attention: Callable[[], torch.Tensor] | None = None


@dataclass
class ReusedChunk:
    start: int  # first prompt row
    end: int
    extras: dict[str, torch.Tensor]  # the entry's stored statistics
    overlap: float  # Cache-Craft's beta': share of its stored context's attention still in front of it


@dataclass
class Deviation:
    """What a layer-wise rule sees at a check layer, for the rows still running ([S] each)."""

    keys: torch.Tensor  # squared L2 distance of fresh vs stored K (same post-RoPE frame), per row
    values: torch.Tensor  # the same for V
    attention_read: Callable[[], torch.Tensor]  # attention the trailing question rows pay each row (lazy)


@dataclass(frozen=True)
class Layerwise:
    """Check layers and the share of reused rows each keeps (gradual filtering when several)."""

    checks: Callable[[ReuseSettings], list[tuple[int, float]]]  # [(layer, share of reused rows kept)]
    score: Callable[[Deviation], torch.Tensor]  # higher: recompute first


@dataclass(frozen=True)
class Mode:
    name: str
    summary: str  # what runs at query time (README table, --help)
    lookup: str  # NONE | EXACT | ANY
    parallel: bool = False  # chunks at shared positions (APE)
    static: Callable[[Candidates, ReuseSettings], torch.Tensor] | None = None  # reused rows recomputed [N] bool
    layerwise: Layerwise | None = None
    needs_statistics: bool = False  # entries must carry Cache-Craft statistics


def _nothing(candidates: Candidates, settings: ReuseSettings) -> torch.Tensor:
    import torch

    return torch.zeros(candidates.size, dtype=torch.bool)


def _epic_rows(candidates: Candidates, settings: ReuseSettings) -> torch.Tensor:
    import torch

    rows = torch.zeros(candidates.size, dtype=torch.bool)
    for chunk in candidates.reused_chunks:
        rows[chunk.start: min(chunk.end, chunk.start + settings.epic_tokens)] = True
    return rows


def _craft_rows(candidates: Candidates, settings: ReuseSettings) -> torch.Tensor:
    """Per chunk N = ceil(CFO·|C|) rows, CFO = alpha·CCI·(1 - beta'), those with the most inter-chunk
    attention when stored; an entry without statistics counts as fully context-dependent (CCI 1) and
    recomputes its first rows, as EPIC would."""
    import torch

    rows = torch.zeros(candidates.size, dtype=torch.bool)
    for chunk in candidates.reused_chunks:
        n_rows = chunk.end - chunk.start
        cci = float(chunk.extras["cci"]) if "cci" in chunk.extras else 1.0
        cfo = min(1.0, max(0.0, settings.craft_alpha * cci * (1.0 - chunk.overlap)))
        n = math.ceil(cfo * n_rows)
        if not n:
            continue
        inter = chunk.extras.get("inter")
        order = inter.float().topk(n).indices if inter is not None and len(inter) == n_rows else torch.arange(n)
        rows[chunk.start + order] = True
    return rows


def recompute_budget(settings: ReuseSettings, reused: int) -> int:
    """Reused rows a budgeted static rule recomputes: `recompute_tokens` when set, else ceil(ratio·reused)."""
    if settings.recompute_tokens < 0:
        raise ConfigError("cache.recompute_tokens", f"must be >= 0, got {settings.recompute_tokens}")
    if not 0.0 <= settings.ratio <= 1.0:
        raise ConfigError("cache.ratio", f"must be in [0, 1], got {settings.ratio}")
    wanted = settings.recompute_tokens or math.ceil(settings.ratio * reused - 1e-9)
    return min(reused, wanted)


def _query_rows(candidates: Candidates, settings: ReuseSettings) -> torch.Tensor:
    """The budget's worth of reused rows: each chunk's first rows, then those the question attends to most, each
    credited with part of its neighbours' score and weighted by its stored staleness (chunk_cache.probe); all
    of them at budget 1, with no first pass."""
    import torch

    rows = torch.zeros(candidates.size, dtype=torch.bool)
    reused = torch.zeros(candidates.size, dtype=torch.bool)
    for chunk in candidates.reused_chunks:
        reused[chunk.start: chunk.end] = True
    n = recompute_budget(settings, int(reused.sum()))
    if n == int(reused.sum()):
        return reused
    if n:
        from chunk_cache import probe

        scores = probe.with_neighbours(candidates.question_attention())
        for chunk in candidates.reused_chunks:
            inter = chunk.extras.get("inter")
            if probe.STALENESS_POWER and inter is not None and len(inter) == chunk.end - chunk.start:
                scores[chunk.start: chunk.end] *= (inter.float() + 1e-3) ** probe.STALENESS_POWER
            scores[chunk.start: chunk.start + probe.SINK_ROWS] = float("inf")
        scores = scores.masked_fill(~reused, -1.0)
        rows[scores.topk(n).indices] = True
    return rows


def _blend_checks(settings: ReuseSettings) -> list[tuple[int, float]]:
    return [(settings.full_layers, settings.ratio)]


def _cacheblend_checks(settings: ReuseSettings) -> list[tuple[int, float]]:
    return [(1, min(1.0, 2 * settings.ratio)), (2, settings.ratio)]


MODES: dict[str, Mode] = {m.name: m for m in [
    Mode("full", "everything (the reference)", NONE, static=_nothing),
    Mode("prefix", "everything after the longest exactly cached prefix (vLLM/SGLang prefix caching)", EXACT,
         static=_nothing),
    Mode("naive", "separators, titles, uncached chunks, the question; cached chunks reused as rotated", ANY,
         static=_nothing),
    Mode("ape", "as naive, chunks (with their titles and separators) at shared positions, question attention "
         "with temperature/scale (APE)", ANY, parallel=True, static=_nothing),
    Mode("epic", "as naive, plus the first `epic_tokens` rows of every inexactly reused chunk (EPIC)", ANY,
         static=_epic_rows),
    Mode("craft", "as naive, plus per chunk `craft_alpha`·CCI·(1-β') of its rows, by stored inter-attention "
         "(Cache-Craft)", ANY, static=_craft_rows, needs_statistics=True),
    Mode("blend", "CacheBlend, ragkit's rule: `full_layers` full layers, then the `ratio` reused rows with the "
         "largest V deviation × attention from the question", ANY,
         layerwise=Layerwise(_blend_checks, lambda d: d.values * d.attention_read())),
    Mode("cacheblend", "CacheBlend, the paper's rule: layer 0 full, then the `ratio` reused rows with the largest "
         "K+V deviation, filtered from 2×`ratio` at layer 1 to `ratio` at layer 2", ANY,
         layerwise=Layerwise(_cacheblend_checks, lambda d: d.keys + d.values)),
    Mode("query", "as naive, plus the `ratio` share (or `recompute_tokens`) of reused rows the question attends to "
         "most in a first pass over the reused KV, fused over heads and layers (ProphetKV), weighted by their "
         "stored inter-chunk attention; each chunk's first row first", ANY, static=_query_rows,
         needs_statistics=True),
]}


def make_mode(name: str) -> Mode:
    if name not in MODES:
        raise ConfigError("cache.mode", f"unknown value {name!r}", allowed=list(MODES))
    return MODES[name]
