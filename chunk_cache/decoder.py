"""What the reuse path needs from a decoder: the pieces of one layer, masks, logits and RoPE frequencies.

`generators.model.Decoder` satisfies these Protocols; chunk_cache never imports it. A forward that
recomputes some rows runs layer by layer: `qkv` (fresh q, k, v of the rows, rotated at their
positions), the mode may look at them, then `finish` (attention over the cache + MLP). Per-request
state (APE's temperature and scale, its context slots) travels on the cache, never on the decoder.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, K, S, R]: one plane per RoPE setting, rows on dim 2


class KVCacheLike(Protocol):
    keys: torch.Tensor  # [L, B, H_kv, capacity, D], post-RoPE
    values: torch.Tensor  # [L, B, H_kv, capacity, D]
    positions: torch.Tensor  # [B, capacity] int64, -1 = empty
    length: int
    context: torch.Tensor | None  # [capacity] bool: APE's parallel context slots, None outside APE
    ape: tuple[float, float] | None  # APE (temperature, scale) for queries outside the contexts
    uploads: Any  # chunk_cache.upload.LayerUploads while reused rows are being copied in, else None

    def ready(self, layer: int) -> None: ...  # the current stream waits until layer `layer` is in place


class ArgsLike(Protocol):
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


class ReuseDecoder(Protocol):
    args: ArgsLike
    softmax_scale: float

    def layer_rope(self, i: int) -> torch.Tensor | None: ...  # layer i's raw inv_freq [R/2] fp32 (no attention
    # scaling): what rope.rerotate needs; None on a layer without RoPE

    @property
    def rope_switch(self) -> int | None: ...  # LongRoPE: forwards reaching past it use other factors

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def new_cache(self, batch: int, capacity: int) -> KVCacheLike: ...

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def rope(self, positions: torch.Tensor) -> Rope: ...

    def qkv(self, i: int, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def finish(self, i: int, x: torch.Tensor, q: torch.Tensor, cache: Any, positions: torch.Tensor,
               masks: Any = None) -> torch.Tensor: ...

    def layer(self, i: int, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: Any, rope: Rope,
              masks: Any = None) -> torch.Tensor: ...

    def masks_for(self, cache: Any, positions: torch.Tensor, slots: torch.Tensor | None = None) -> Any: ...

    def logits(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Any, slots: torch.Tensor,
                logits_rows: slice | torch.Tensor = slice(-1, None)) -> torch.Tensor: ...
