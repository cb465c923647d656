"""A decoder for every family in generators.families, whose KV cache, positions and masks are explicit.

Every forward names the rows it computes: their hidden states, absolute RoPE positions and the cache
slots their keys and values go to. Full prefill, decoding and partial recomputation of a reused
cache are therefore one code path, and a recomputed row attends with an exact mask (key position <=
query position, and > query position - window on a sliding-window layer) whatever rows around it
were reused. Family traits (q/k norms, norm placement, soft-capping, per-layer RoPE and windows,
multipliers, experts) live in ModelArgs; the modules are in generators.layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right

from chunk_cache.rope import rotate_half
from generators.families import ModelArgs, RopeTable, rope_frequencies  # noqa: F401  (rope_frequencies: API)
from generators.layers import Block, KVCache, RMSNorm, ScaledEmbedding, map_state
from generators.weights import ModelInfo
from ragkit.errors import InputError


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs, rope: RopeTable):
        super().__init__()
        self.args = args
        self.embed_tokens = ScaledEmbedding(args.vocab_size, args.dim, args.embed_scale)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.family.gemma_norm)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope_table = rope
        self.softmax_scale = args.softmax_scale or args.head_dim ** -0.5
        self.windows = sorted({w for w in args.windows if w})

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def inv_freq(self) -> torch.Tensor:
        """The first RoPE setting's raw frequencies; per layer see `layer_rope`."""
        return self.rope_table.inv_freq[0]

    def layer_rope(self, i: int) -> torch.Tensor | None:
        """Layer i's raw inv_freq [R/2] (R = rotated dims, the leading ones), None on a layer without RoPE:
        what re-rotating a cached key of that layer needs (chunk_cache.rope). Under LongRoPE these are the
        short factors: stored entries never cross the switch (chunk_cache.assembly refuses it)."""
        index = self.args.rope_of_layer[i]
        return None if index is None else self.rope_table.inv_freq[index]

    @property
    def rope_switch(self) -> int | None:
        """LongRoPE: a forward whose rows reach past this many positions uses the long factors."""
        return self.rope_table.switch

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache.empty(self.args, batch, capacity, self.dtype, self.device)

    # --- pieces of one layer --------------------------------------------------------------

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, K, S, R] for positions [B, S], one plane per RoPE setting (K of them; layer i uses
        plane `rope_of_layer[i]`), in fp32 like transformers. LongRoPE picks its long factors when the
        forward's last position passes the switch, as transformers does per forward."""
        table = self.rope_table
        long = table.switch is not None and int(positions.max()) + 1 > table.switch
        cos, sin = [], []
        for k, inv_freq in enumerate(table.inv_freq):
            inv_freq = table.long_inv_freq[k] if long else inv_freq
            angles = positions[..., None].float() * inv_freq.to(positions.device)  # [B, S, R/2]
            angles = torch.cat([angles, angles], dim=-1)
            cos.append((angles.cos() * table.scaling[k]).to(self.dtype))
            sin.append((angles.sin() * table.scaling[k]).to(self.dtype))
        return torch.stack(cos, 1), torch.stack(sin, 1)

    def qkv(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Layer i's q [B, H, S, D], k [B, H_kv, S, D] (both normed and rotated as the family does) and v."""
        attn, args, block = self.layers[i].self_attn, self.args, self.layers[i]
        h = block.input_layernorm(x) if args.family.norms != "post" else x
        B, S, _ = h.shape
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        if args.family.qk_norm == "projection":
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q.view(B, S, args.n_heads, args.head_dim).transpose(1, 2)
        k = k.view(B, S, args.n_kv_heads, args.head_dim).transpose(1, 2)
        v = v.view(B, S, args.n_kv_heads, args.head_dim).transpose(1, 2)
        if args.family.qk_norm == "head":
            q, k = attn.q_norm(q), attn.k_norm(k)
        plane = args.rope_of_layer[i]
        if plane is None:
            return q, k, v
        cos, sin = rope[0][:, plane: plane + 1], rope[1][:, plane: plane + 1]
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def finish(self, i: int, x: torch.Tensor, q: torch.Tensor, cache: KVCache, positions: torch.Tensor,
               masks: "list[MaskBlock] | str | dict | None" = None) -> torch.Tensor:
        """Attention of queries q (rows at `positions` [B, S]) over the cache, then the MLP.

        masks: what `masks_for` returned for these rows (they depend on positions only, so one forward
        builds them once for all layers; per window size when the model has sliding-window layers), or None.
        """
        layer, window = self.layers[i], self.args.windows[i] if self.args.windows else None
        if isinstance(masks, dict):
            masks = masks[window]
        keys, values = cache.keys[i, :, :, : cache.length], cache.values[i, :, :, : cache.length]
        with sdpa_kernel(SDPA_BACKENDS):
            out = self._attend(q, keys, values, cache, positions, masks, window)
        B, _, S, _ = q.shape
        attended = layer.self_attn.o_proj(out.transpose(1, 2).reshape(B, S, -1))
        return layer.feed_forward(x, attended, self.args.family.norms, self.args.residual_scale)

    def _attend(self, q, keys, values, cache: KVCache, positions: torch.Tensor, masks, window) -> torch.Tensor:
        """q [B, H, S, D] over keys/values [B, H_kv, T, D]: causal kernel, APE, or exact position masks."""
        cap = self.args.attn_softcap
        if isinstance(masks, CausalBias) and cap is None:  # a contiguous tail behind an exact prefix
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=masks, scale=self.softmax_scale,
                                                  enable_gqa=True)
        if isinstance(masks, str) and masks == CAUSAL and cap is None:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.softmax_scale,
                                                  enable_gqa=True)
        key_positions = cache.positions[:, : cache.length]
        if cache.ape is not None:
            return ape_attention(q, keys, values, key_positions, positions, cache.context[: cache.length], cache.ape,
                                 self.softmax_scale, window, cap)
        if q.shape[2] == 1:  # decoding: one row per sequence
            return decode_attention(q, keys, values, key_positions, positions, self.softmax_scale, window, cap)
        if masks is None or isinstance(masks, (str, CausalBias)):
            masks = attention_masks(key_positions, positions, window)
        return masked_attention(q, keys, values, masks, self.softmax_scale, cap)

    def layer(self, i: int, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache,
              rope, masks: "list[MaskBlock] | str | dict | None" = None) -> torch.Tensor:
        cache.ready(i)
        q, k, v = self.qkv(i, x, rope)
        cache.keys[i, :, :, slots] = k
        cache.values[i, :, :, slots] = v
        return self.finish(i, x, q, cache, positions, masks)

    def masks_for(self, cache: KVCache, positions: torch.Tensor,
                  slots: torch.Tensor | None = None) -> "list[MaskBlock] | str | dict | None":
        """Masks for rows at `positions` (in cache `slots`) over the cache as it is laid out now, None under
        APE. Rows that are the cache's contiguous tail, in position order behind slots that hold positions
        0.. in order, get SDPA's causal kernel: a full prefill always, everything after an exactly reused
        prefix (aligned lower-right) where the kernel has it natively (TAIL_KERNEL_DEVICES; on the CPU
        torch builds the whole mask, and per-block masks were 1.4x faster in our runs). Other rows get
        exact position masks. A model with sliding-window layers gets {window or None: masks}: a window
        layer keeps the causal kernel only while no row's window cuts anything off."""
        if cache.ape is not None:
            return None
        full = self._masks(cache, positions, slots)
        if not self.windows:
            return full
        key_positions = cache.positions[:, : cache.length]
        windowed = {None: full}
        for window in self.windows:
            cut = bool(((key_positions[:, None, :] >= 0)
                        & (key_positions[:, None, :] <= positions[:, :, None] - window)).any())
            windowed[window] = full if not cut else attention_masks(key_positions, positions, window)
        return windowed

    def _masks(self, cache: KVCache, positions: torch.Tensor, slots: torch.Tensor | None):
        n = positions.shape[1]
        if slots is not None and n > 1 and len(slots) == n and int(slots[-1]) + 1 == cache.length:
            start = cache.length - n
            tail = torch.arange(start, cache.length, device=slots.device)
            head = cache.positions[:, :start] == torch.arange(start, device=cache.positions.device)
            if bool((slots == tail).all()) and bool((positions == tail).all()) and bool(head.all()):
                if start == 0:
                    return CAUSAL
                if slots.device.type in TAIL_KERNEL_DEVICES:
                    return causal_lower_right(n, cache.length)
        return attention_masks(cache.positions[:, : cache.length], positions)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(x)).float()
        if self.args.logits_divisor != 1.0:
            logits = logits / self.args.logits_divisor
        if self.args.final_softcap:
            logits = torch.tanh(logits / self.args.final_softcap) * self.args.final_softcap
        return logits

    # --- whole forwards -----------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                logits_rows: slice | torch.Tensor = slice(-1, None)) -> torch.Tensor:
        """Compute rows `tokens` [B, S] at `positions` [B, S] into cache `slots` [S]; logits [B, S', V] of
        `logits_rows`. The cache must already hold every other slot the rows attend to."""
        end = int(slots.max()) + 1
        cache.ensure_capacity(end)
        cache.positions[:, slots] = positions
        cache.length = max(cache.length, end)
        masks = self.masks_for(cache, positions, slots)
        x = self.embed_tokens(tokens)
        rope = self.rope(positions)
        for i in range(self.args.n_layers):
            x = self.layer(i, x, positions, slots, cache, rope, masks)
        return self.logits(x[:, logits_rows])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the leading cos.shape[-1] dims of x (all of them unless the rotary is partial)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


# cuDNN's attention builds an execution plan for each new shape (0.8-1.2 s on an H200 in our runs), and
# every prompt, block and recomputed-row set has new shapes; flash and memory-efficient kernels do not.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Query rows per attention call, per device type: each block only reads the keys up to its last row's
# position, so an explicit mask costs about what a causal kernel does instead of reading every key. On a
# CPU a call costs little and 64-row blocks cut the keys that sparse recomputed rows read (query and blend
# prefills 7-9% faster at 5 passages, BENCHMARKS.md); on an accelerator each call is a kernel launch.
QUERY_BLOCK = {"cpu": 64, "other": 512}
CAUSAL = "causal"
TAIL_KERNEL_DEVICES = {"cuda"}  # where a lower-right causal kernel serves a tail behind an exact prefix
MaskBlock = tuple[int, int, int, torch.Tensor]  # query rows [start, end), key slots [0, reach), mask [B, 1, s, reach]


def attention_masks(key_positions: torch.Tensor, query_positions: torch.Tensor,
                    window: int | None = None) -> list[MaskBlock]:
    """Exact causal masks by position: a query sees slot t iff 0 <= key_positions[b, t] <= its position
    (and key_positions[b, t] > its position - window on a sliding-window layer, as transformers masks).

    key_positions [B, T] (-1 = empty), query_positions [B, S]; one entry per block of QUERY_BLOCK rows.
    """
    blocks = []
    size = QUERY_BLOCK.get(key_positions.device.type, QUERY_BLOCK["other"])
    for start in range(0, query_positions.shape[1], size):
        qpos = query_positions[:, start: start + size]
        allowed = visible(key_positions, qpos, window)  # [B, s, T]
        # Slots are in position order except for padding: the block needs keys up to the last allowed slot.
        reachable = allowed.any(dim=(0, 1)).nonzero()
        reach = int(reachable.max()) + 1 if len(reachable) else 1
        mask = allowed[:, None, :, :reach]
        mask = mask | ~mask.any(-1, keepdim=True)  # padding rows see everything rather than produce NaN
        blocks.append((start, start + qpos.shape[1], reach, mask))
    return blocks


def visible(key_positions: torch.Tensor, query_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, S, T]: which keys (positions [B, T], -1 empty) each query (positions [B, S]) attends to."""
    keys, queries = key_positions[:, None, :], query_positions[:, :, None]
    allowed = (keys >= 0) & (keys <= queries)
    return allowed & (keys > queries - window) if window else allowed


def masked_attention(q, keys, values, masks: list[MaskBlock], scale, softcap: float | None = None):
    """q [B, H, S, D] over keys/values [B, H_kv, T, D] under `attention_masks`; returns [B, H, S, D].
    With an attention soft-cap (Gemma 2) the scores are capped before the mask, so SDPA cannot serve."""
    if softcap is not None:
        return torch.cat([capped_attention(q[:, :, start:end], keys[:, :, :reach], values[:, :, :reach], mask, scale,
                                           softcap) for start, end, reach, mask in masks], dim=2)
    gqa = keys.shape[1] != q.shape[1]
    if gqa and q.is_cuda:  # CUDA's memory-efficient kernel takes a mask but not GQA: one KV head per query head
        groups = q.shape[1] // keys.shape[1]
        keys, values, gqa = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1), False
    outs = [F.scaled_dot_product_attention(q[:, :, start:end], keys[:, :, :reach], values[:, :, :reach],
                                           attn_mask=mask, scale=scale, enable_gqa=gqa)
            for start, end, reach, mask in masks]
    return torch.cat(outs, dim=2)


def capped_attention(q, keys, values, mask, scale, softcap):
    """Eager attention with scores soft-capped, cap * tanh(s / cap), then masked; mask [B, 1, S, T] bool."""
    groups = q.shape[1] // keys.shape[1]
    scores = (q @ keys.repeat_interleave(groups, 1).transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
    return probs @ values.repeat_interleave(groups, 1)


def decode_attention(q, keys, values, key_positions, query_positions, scale, window: int | None = None,
                     softcap: float | None = None):
    """One query row per sequence, q [B, H, 1, D], over keys/values [B, H_kv, T, D]; returns [B, H, 1, D].

    Decoding reads every sequence's whole KV for one row: the query heads of a group share their KV
    head's matrix product, so each KV head is read once (no per-step copy per query head), and slots
    outside 0 <= position <= the row's position (padding, other rows' lengths) are masked.
    """
    B, H, _, D = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(B, kv_heads, H // kv_heads, D)  # query head h uses KV head h // G, like repeat_interleave
    scores = (grouped @ keys.transpose(-1, -2)).float() * scale  # [B, H_kv, G, T]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    seen = visible(key_positions, query_positions.reshape(B, 1), window)[:, 0]  # [B, T]
    probs = scores.masked_fill(~seen[:, None, None, :], float("-inf")).softmax(-1)
    return (probs.to(values.dtype) @ values).reshape(B, H, 1, D)


def ape_attention(q, keys, values, key_positions, query_positions, context, ape: tuple[float, float], scale,
                  window: int | None = None, softcap: float | None = None):
    """APE: softmax over context keys at temperature T and over the other visible keys, merged by
    log-sum-exp with the context part weighted by Z_c^(S*T). T = S = 1 is ordinary attention."""
    temperature, ape_scale = ape
    groups = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(groups, dim=1).float()
    v = values.repeat_interleave(groups, dim=1).float()
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [B, H, S, T]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    seen = visible(key_positions, query_positions, window)[:, None]  # [B, 1, S, T]
    ctx = seen & context[None, None, None, :]
    other = seen & ~context[None, None, None, :]
    neg = torch.finfo(torch.float32).min
    ctx_scores = torch.where(ctx, scores / temperature, neg)
    other_scores = torch.where(other, scores, neg)
    lse_ctx = torch.logsumexp(ctx_scores, -1, keepdim=True)  # ln Z_c
    lse_other = torch.logsumexp(other_scores, -1, keepdim=True)  # ln Z_o
    weight_ctx = ape_scale * temperature * lse_ctx
    has_ctx = ctx.any(-1, keepdim=True)
    weight_ctx = torch.where(has_ctx, weight_ctx, neg)
    norm = torch.logaddexp(weight_ctx, lse_other)
    probs = torch.where(ctx, torch.exp(ctx_scores - lse_ctx + weight_ctx - norm), 0.0) \
        + torch.where(other, torch.exp(other_scores - norm), 0.0)
    return (probs @ v).to(q.dtype)


def load_decoder(info: ModelInfo, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Decoder:
    """Build the decoder from a model folder's config (ModelInfo) and its safetensors weights."""
    from safetensors.torch import load_file

    folder = info.folder
    args, rope = ModelArgs.from_info(info)
    with torch.device("meta"):
        model = Decoder(args, rope)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(folder, "no *.safetensors weights in the model folder")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    state = {name: t.to(dtype) for name, t in map_state(state, args).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise InputError(folder, f"weights do not match the {args.architecture} layout "
                         f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    return model.to(device).eval().requires_grad_(False)
