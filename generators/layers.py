"""The decoder's modules, each family trait implemented once (generators.families says who uses which),
the preallocated KV cache, and how published weight names map onto the modules.

Module and parameter names are transformers' own, so a checkpoint loads by name; the two layouts that
differ on disk are mapped at load: Phi-3's fused `qkv_proj`/`gate_up_proj` are split, and a MoE's
per-expert `experts.E.{gate,up,down}_proj` (Mixtral: `block_sparse_moe.experts.E.w1/w3/w2`) are stacked
into transformers 5's 3-D expert tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from generators.families import ModelArgs

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    """Llama's RMSNorm (w * x̂ cast back), or Gemma's ((1 + w) * x̂ in fp32, then cast)."""

    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times a constant: Gemma's sqrt(hidden) (in the weights' dtype), Granite's multiplier."""

    def __init__(self, vocab: int, dim: int, scale: float):
        super().__init__(vocab, dim)
        self.scale = scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = super().forward(tokens)
        return out if self.scale == 1.0 else out * torch.tensor(self.scale, dtype=out.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        qk_norm, gemma = args.family.qk_norm, args.family.gemma_norm
        if qk_norm == "head":  # per head, after the reshape (Qwen3, Gemma 3)
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, gemma)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, gemma)
        elif qk_norm == "projection":  # over all heads, before the reshape (OLMo 2)
            self.q_norm = RMSNorm(args.n_heads * args.head_dim, args.norm_eps, gemma)
            self.k_norm = RMSNorm(args.n_kv_heads * args.head_dim, args.norm_eps, gemma)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)
        self.act = ACTIVATIONS[args.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        moe = args.moe
        self.gate_up_proj = nn.Parameter(torch.empty(moe.experts, 2 * moe.ffn_dim, args.dim))
        self.down_proj = nn.Parameter(torch.empty(moe.experts, args.dim, moe.ffn_dim))


class SparseMoE(nn.Module):
    """Top-k routed experts (Qwen3-MoE, Mixtral): softmax router in fp32, top-k, optionally renormalised."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.moe = args.moe
        self.gate = nn.Linear(args.dim, args.moe.experts, bias=False)
        self.experts = Experts(args)
        self.act = ACTIVATIONS[args.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.gate(flat)
        probs = logits.softmax(-1, dtype=torch.float)
        weights, chosen = probs.topk(self.moe.top_k, dim=-1)  # [N, k]
        if self.moe.norm_top_k:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(logits.dtype)
        out = torch.zeros_like(flat)
        for expert in chosen.unique().tolist():
            token, slot = torch.where(chosen == expert)
            gate, up = F.linear(flat[token], self.experts.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.experts.down_proj[expert]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        gemma, eps, norms = args.family.gemma_norm, args.norm_eps, args.family.norms
        self.self_attn = Attention(args)
        self.mlp = SparseMoE(args) if args.moe is not None and args.moe.sparse[i] else MLP(args)
        if norms != "post":
            self.input_layernorm = RMSNorm(args.dim, eps, gemma)
        self.post_attention_layernorm = RMSNorm(args.dim, eps, gemma)
        if norms == "sandwich":
            self.pre_feedforward_layernorm = RMSNorm(args.dim, eps, gemma)
        if norms in ("sandwich", "post"):
            self.post_feedforward_layernorm = RMSNorm(args.dim, eps, gemma)

    def feed_forward(self, x: torch.Tensor, attended: torch.Tensor, norms: str, residual_scale: float):
        """The residual stream after attention output `attended` and the MLP, with the family's norm placement."""
        if norms == "pre":
            x = x + attended * residual_scale
            return x + self.mlp(self.post_attention_layernorm(x)) * residual_scale
        x = x + self.post_attention_layernorm(attended)
        h = self.pre_feedforward_layernorm(x) if norms == "sandwich" else x
        return x + self.post_feedforward_layernorm(self.mlp(h))


@dataclass
class KVCache:
    """Preallocated keys and values of every layer (gpt-fast style), post-RoPE.

    `positions[b, t]` is the RoPE position slot t was computed at (-1: empty or padding); a query
    attends to slot t iff 0 <= positions[b, t] <= its own position (and, on a sliding-window layer,
    positions[b, t] > its position - window). Under APE, `context` marks the parallel context slots and
    `ape` holds (temperature, scale) for queries over them: per-request state, so it lives here and
    never on the decoder. `uploads`: reused rows still being copied in layer by layer
    (chunk_cache.upload); a layer calls `ready(i)` before it touches layer i.
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


_EXPERT = re.compile(r"(layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
# The text model's weights: Llama-style `model.`, or a multimodal checkpoint's text tower (4.x and 5.x names).
_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.", "model.")
_NOT_TEXT = ("vision_tower.", "multi_modal_projector.")
_EXPERT_PART = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral's names


def map_state(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Published tensor names -> this decoder's (prefix `model.` dropped, fused and per-expert layouts mapped)."""
    out, experts = {}, {}
    for name, tensor in state.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's MoE block
        if name.endswith("rotary_emb.inv_freq") or name.startswith(_NOT_TEXT):
            continue
        if name.endswith("self_attn.qkv_proj.weight"):
            sizes = [args.n_heads * args.head_dim] + [args.n_kv_heads * args.head_dim] * 2
            for part, piece in zip("qkv", tensor.split(sizes)):
                out[name.replace("qkv_proj", f"{part}_proj")] = piece
        elif name.endswith("mlp.gate_up_proj.weight"):
            gate, up = tensor.chunk(2)
            out[name.replace("gate_up_proj", "gate_proj")], out[name.replace("gate_up_proj", "up_proj")] = gate, up
        elif match := _EXPERT.fullmatch(name):
            part = _EXPERT_PART.get(match[3], match[3])
            experts.setdefault(match[1], {}).setdefault(part, {})[int(match[2])] = tensor
        else:
            out[name] = tensor
    for prefix, parts in experts.items():
        stack = {kind: torch.stack([parts[kind][e] for e in sorted(parts[kind])]) for kind in parts}
        out[f"{prefix}.experts.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)
        out[f"{prefix}.experts.down_proj"] = stack["down_proj"]
    if args.tie_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out
