"""A Llama-family decoder whose KV cache, positions and attention mask are explicit.

Supported: LlamaForCausalLM (Llama 2/3, SmolLM), MistralForCausalLM and Qwen2ForCausalLM (q/k/v bias).
Every forward names the rows it computes: their hidden states, absolute RoPE positions and the cache
slots their keys and values go to. Full prefill, decoding and partial recomputation of a reused
cache are therefore one code path, and a recomputed row attends with an exact causal mask
(key position <= query position) whatever rows around it were reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right

from chunk_cache.rope import rotate_half
from ragkit.errors import InputError

# architecture -> whether q/k/v projections carry a bias
ARCHITECTURES = {"LlamaForCausalLM": False, "MistralForCausalLM": False, "Qwen2ForCausalLM": True}
# RoPE types whose rotation depends on position only; `dynamic` and `longrope` change frequencies
# with the sequence length, so a cached key could not be moved by a rotation.
ROPE_TYPES = ["default", "linear", "llama3", "yarn"]


_REQUIRED_KEYS = ("hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers", "intermediate_size")


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    qkv_bias: bool
    tie_embeddings: bool

    @classmethod
    def from_folder(cls, folder: Path) -> tuple["ModelArgs", dict]:
        path = folder / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(path, f"not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise InputError(path, "expected a JSON object")
        arch = (config.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise InputError(path, f"unsupported architecture {arch!r}",
                             hint=f"supported: {', '.join(ARCHITECTURES)}")
        missing = [key for key in _REQUIRED_KEYS if key not in config]
        if missing:
            raise InputError(path, f"missing {', '.join(missing)} for a {arch} model")
        window = config.get("sliding_window")
        if window and config.get("use_sliding_window", True) and window < config.get("max_position_embeddings", 0):
            raise InputError(path, f"this {arch} model attends through a sliding window of {window} tokens, which "
                             "ragkit's decoder does not implement (prompts past the window would be computed wrongly)",
                             hint="use a model without sliding-window attention (e.g. Mistral v0.2+, Llama, Qwen2 "
                             "with use_sliding_window false)")
        dim, n_heads = config["hidden_size"], config["num_attention_heads"]
        args = cls(
            architecture=arch,
            vocab_size=config["vocab_size"],
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or dim // n_heads,
            ffn_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            qkv_bias=ARCHITECTURES[arch] or bool(config.get("attention_bias", False)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
        return args, config


def rope_frequencies(config: dict, head_dim: int, source: Path | str = "config.json") -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2] fp32, attention_scaling) for the model's RoPE; refuses length-dependent scalings."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise InputError(source, f"RoPE type {rope_type!r} changes frequencies with sequence length, so cached "
                         "keys cannot be re-positioned", hint=f"supported: {', '.join(ROPE_TYPES)}")
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope_type == "default":
        return inv_freq.float(), 1.0
    if rope_type == "linear":
        return (inv_freq / float(params["factor"])).float(), 1.0
    # llama3 and yarn: transformers owns the exact formulas; both depend on position only.
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = PretrainedConfig(**config)
    hf_config.rope_parameters = params
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv.float(), float(scaling)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)


@dataclass
class KVCache:
    """Preallocated keys and values of every layer (gpt-fast style), post-RoPE.

    `positions[b, t]` is the RoPE position slot t was computed at (-1: empty or padding); a query
    attends to slot t iff 0 <= positions[b, t] <= its own position. Under APE, `context` marks the
    parallel context slots and `ape` holds (temperature, scale) for queries over them: per-request
    state, so it lives here and never on the decoder. `uploads`: reused rows still being copied in
    layer by layer (chunk_cache.upload); a layer calls `ready(i)` before it touches layer i.
    """

    keys: torch.Tensor  # [L, B, H_kv, capacity, D]
    values: torch.Tensor  # [L, B, H_kv, capacity, D]
    positions: torch.Tensor  # [B, capacity] int64
    length: int = 0
    context: torch.Tensor | None = None  # [capacity] bool
    ape: tuple[float, float] | None = None
    uploads: Any = None  # chunk_cache.upload.LayerUploads while a prefill's copies are in flight

    def ready(self, layer: int) -> None:
        """Make the current stream wait until layer `layer`'s uploaded rows are in place (nothing to wait
        for on a CPU or once the prefill is done)."""
        if self.uploads is not None:
            self.uploads.wait(layer)

    @classmethod
    def empty(cls, args: ModelArgs, batch: int, capacity: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (args.n_layers, batch, args.n_kv_heads, capacity, args.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.full((batch, capacity), -1, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def ensure_capacity(self, needed: int) -> None:
        """Grow (by doubling) so that `needed` slots fit; decoding calls it before each step."""
        if needed <= self.capacity:
            return
        extra = max(needed, 2 * self.capacity) - self.capacity
        pad = list(self.keys.shape)
        pad[3] = extra
        self.keys = torch.cat([self.keys, self.keys.new_zeros(pad)], dim=3)
        self.values = torch.cat([self.values, self.values.new_zeros(pad)], dim=3)
        self.positions = torch.cat([self.positions, self.positions.new_full((self.positions.shape[0], extra), -1)], 1)
        if self.context is not None:
            self.context = torch.cat([self.context, self.context.new_zeros(extra)])


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2] fp32, raw (no attention scaling)
        self.attention_scaling = attention_scaling
        self.softmax_scale = args.head_dim ** -0.5
        self.source = ""  # the folder the weights came from (for the cache fingerprint)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache.empty(self.args, batch, capacity, self.dtype, self.device)

    # --- pieces of one layer --------------------------------------------------------------

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, S, D] for positions [B, S], computed in fp32 like transformers."""
        angles = positions[..., None].float() * self.inv_freq  # [B, S, D/2]
        angles = torch.cat([angles, angles], dim=-1)
        cos = (angles.cos() * self.attention_scaling).to(self.dtype)
        sin = (angles.sin() * self.attention_scaling).to(self.dtype)
        return cos[:, None], sin[:, None]

    def qkv(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Layer i's q [B, H, S, D], k [B, H_kv, S, D] (both rotated) and v [B, H_kv, S, D]."""
        attn, args = self.layers[i].self_attn, self.args
        h = self.layers[i].input_layernorm(x)
        B, S, _ = h.shape
        q = attn.q_proj(h).view(B, S, args.n_heads, args.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(B, S, args.n_kv_heads, args.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(B, S, args.n_kv_heads, args.head_dim).transpose(1, 2)
        cos, sin = rope
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def finish(self, i: int, x: torch.Tensor, q: torch.Tensor, cache: KVCache, positions: torch.Tensor,
               masks: "list[MaskBlock] | str | None" = None) -> torch.Tensor:
        """Attention of queries q (rows at `positions` [B, S]) over the cache, then the MLP.

        masks: CAUSAL (rows fill the cache from slot 0), the rows' precomputed `attention_masks`
        (they depend on positions only, so one forward builds them once for all layers), or None.
        """
        layer = self.layers[i]
        keys, values = cache.keys[i, :, :, : cache.length], cache.values[i, :, :, : cache.length]
        with sdpa_kernel(SDPA_BACKENDS):
            out = self._attend(q, keys, values, cache, positions, masks)
        B, _, S, _ = q.shape
        x = x + layer.self_attn.o_proj(out.transpose(1, 2).reshape(B, S, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _attend(self, q, keys, values, cache: KVCache, positions: torch.Tensor, masks) -> torch.Tensor:
        """q [B, H, S, D] over keys/values [B, H_kv, T, D]: causal kernel, APE, or exact position masks."""
        if isinstance(masks, CausalBias):  # a contiguous tail behind an exact prefix
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=masks, scale=self.softmax_scale,
                                                  enable_gqa=True)
        if isinstance(masks, str) and masks == CAUSAL:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.softmax_scale,
                                                  enable_gqa=True)
        if cache.ape is not None:
            return ape_attention(q, keys, values, cache.positions[:, : cache.length], positions,
                                 cache.context[: cache.length], cache.ape, self.softmax_scale)
        if q.shape[2] == 1:  # decoding: one row per sequence
            return decode_attention(q, keys, values, cache.positions[:, : cache.length], positions, self.softmax_scale)
        masks = masks if masks is not None else attention_masks(cache.positions[:, : cache.length], positions)
        return masked_attention(q, keys, values, masks, self.softmax_scale)

    def layer(self, i: int, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KVCache,
              rope, masks: "list[MaskBlock] | str | None" = None) -> torch.Tensor:
        cache.ready(i)
        q, k, v = self.qkv(i, x, rope)
        cache.keys[i, :, :, slots] = k
        cache.values[i, :, :, slots] = v
        return self.finish(i, x, q, cache, positions, masks)

    def masks_for(self, cache: KVCache, positions: torch.Tensor,
                  slots: torch.Tensor | None = None) -> "list[MaskBlock] | str | None":
        """Masks for rows at `positions` (in cache `slots`) over the cache as it is laid out now, None under
        APE. Rows that are the cache's contiguous tail, in position order behind slots that hold positions
        0.. in order, get SDPA's causal kernel: a full prefill always, everything after an exactly reused
        prefix (aligned lower-right) where the kernel has it natively (TAIL_KERNEL_DEVICES; on the CPU
        torch builds the whole mask, and per-block masks were 1.4x faster in our runs). Other rows get
        exact position masks."""
        if cache.ape is not None:
            return None
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
        return self.lm_head(self.norm(x)).float()

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


# cuDNN's attention builds an execution plan for each new shape (0.8-1.2 s on an H200 in our runs), and
# every prompt, block and recomputed-row set has new shapes; flash and memory-efficient kernels do not.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Query rows per attention call: each block only reads the keys up to its last row's position,
# so an explicit mask costs about what a causal kernel does instead of reading every key.
QUERY_BLOCK = 512
CAUSAL = "causal"
TAIL_KERNEL_DEVICES = {"cuda"}  # where a lower-right causal kernel serves a tail behind an exact prefix
MaskBlock = tuple[int, int, int, torch.Tensor]  # query rows [start, end), key slots [0, reach), mask [B, 1, s, reach]


def attention_masks(key_positions: torch.Tensor, query_positions: torch.Tensor) -> list[MaskBlock]:
    """Exact causal masks by position: a query sees slot t iff 0 <= key_positions[b, t] <= its position.

    key_positions [B, T] (-1 = empty), query_positions [B, S]; one entry per block of QUERY_BLOCK rows.
    """
    blocks = []
    for start in range(0, query_positions.shape[1], QUERY_BLOCK):
        qpos = query_positions[:, start: start + QUERY_BLOCK]
        allowed = (key_positions[:, None, :] >= 0) & (key_positions[:, None, :] <= qpos[:, :, None])  # [B, s, T]
        # Slots are in position order except for padding: the block needs keys up to the last allowed slot.
        reachable = allowed.any(dim=(0, 1)).nonzero()
        reach = int(reachable.max()) + 1 if len(reachable) else 1
        mask = allowed[:, None, :, :reach]
        mask = mask | ~mask.any(-1, keepdim=True)  # padding rows see everything rather than produce NaN
        blocks.append((start, start + qpos.shape[1], reach, mask))
    return blocks


def masked_attention(q, keys, values, masks: list[MaskBlock], scale):
    """q [B, H, S, D] over keys/values [B, H_kv, T, D] under `attention_masks`; returns [B, H, S, D]."""
    gqa = keys.shape[1] != q.shape[1]
    if gqa and q.is_cuda:  # CUDA's memory-efficient kernel takes a mask but not GQA: one KV head per query head
        groups = q.shape[1] // keys.shape[1]
        keys, values, gqa = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1), False
    outs = [F.scaled_dot_product_attention(q[:, :, start:end], keys[:, :, :reach], values[:, :, :reach],
                                           attn_mask=mask, scale=scale, enable_gqa=gqa)
            for start, end, reach, mask in masks]
    return torch.cat(outs, dim=2)


def decode_attention(q, keys, values, key_positions, query_positions, scale):
    """One query row per sequence, q [B, H, 1, D], over keys/values [B, H_kv, T, D]; returns [B, H, 1, D].

    Decoding reads every sequence's whole KV for one row: the query heads of a group share their KV
    head's matrix product, so each KV head is read once (no per-step copy per query head), and slots
    outside 0 <= position <= the row's position (padding, other rows' lengths) are masked.
    """
    B, H, _, D = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(B, kv_heads, H // kv_heads, D)  # query head h uses KV head h // G, like repeat_interleave
    scores = (grouped @ keys.transpose(-1, -2)).float() * scale  # [B, H_kv, G, T]
    visible = (key_positions >= 0) & (key_positions <= query_positions.reshape(B, 1))  # [B, T]
    probs = scores.masked_fill(~visible[:, None, None, :], float("-inf")).softmax(-1)
    return (probs.to(values.dtype) @ values).reshape(B, H, 1, D)


def ape_attention(q, keys, values, key_positions, query_positions, context, ape: tuple[float, float], scale):
    """APE: softmax over context keys at temperature T and over the other visible keys, merged by
    log-sum-exp with the context part weighted by Z_c^(S*T). T = S = 1 is ordinary attention."""
    temperature, ape_scale = ape
    groups = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(groups, dim=1).float()
    v = values.repeat_interleave(groups, dim=1).float()
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [B, H, S, T]
    visible = (key_positions[:, None, :] >= 0) & (key_positions[:, None, :] <= query_positions[:, :, None])
    visible = visible[:, None]  # [B, 1, S, T]
    ctx = visible & context[None, None, None, :]
    other = visible & ~context[None, None, None, :]
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


def load_decoder(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Decoder:
    """Build the decoder from a local Hugging Face folder (config.json + safetensors)."""
    from safetensors.torch import load_file

    args, config = ModelArgs.from_folder(folder)
    inv_freq, scaling = rope_frequencies(config, args.head_dim, folder / "config.json")
    with torch.device("meta"):
        model = Decoder(args, inv_freq, scaling)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(folder, "no *.safetensors weights in the model folder")
    state = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            state[name.removeprefix("model.")] = tensor
    if args.tie_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    state = {name: t.to(dtype) for name, t in state.items() if not name.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise InputError(folder, f"weights do not match the {args.architecture} layout "
                         f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    model.inv_freq = inv_freq
    model.source = str(folder)
    return model.to(device).eval().requires_grad_(False)
