"""Model families: one table of the traits each architecture needs, read once into `ModelArgs`.

A family is a row of FAMILIES; the decoder (generators.model) implements every trait once and reads
only ModelArgs. config.json is normalised by transformers' own config class first, so the 4.x and 5.x
spellings (`rope_scaling` + top-level `rope_theta`, `type`/`rope_type`, Gemma 3's `rope_local_base_freq`,
`sliding_window_pattern`) arrive as one `rope_parameters` and one `layer_types`.

Never silently wrong: a config whose model_type is not its architecture's, a layer type other than full
or sliding attention, a trait key this family does not implement, or a RoPE that depends on the sequence
length (`dynamic`) is refused by name, before any weight is read.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from generators.weights import ModelInfo
from ragkit.errors import InputError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json model_type values this architecture is written with
    examples: str  # published checkpoints of the family (README, `ragkit models`)
    qkv_bias: bool = False  # q/k/v projections carry a bias whatever attention_bias says (Qwen2)
    qk_norm: str | None = None  # "head": RMSNorm per head (Qwen3, Gemma 3); "projection": over all heads (OLMo 2)
    norms: str = "pre"  # "pre" (Llama), "sandwich" (pre and post, Gemma 2/3), "post" (after the outputs, OLMo 2)
    gemma_norm: bool = False  # RMSNorm scales by (1 + w), computed in fp32
    fused: bool = False  # qkv_proj and gate_up_proj (Phi-3/4), split at load
    window_everywhere: bool = False  # `sliding_window` applies to every layer (Mistral, Phi-3); else per layer_types
    traits: frozenset[str] = frozenset()  # the TRAIT_KEYS this family implements


# Config keys that change what a layer computes, with their neutral values. A family may carry one with a
# non-neutral value only if it lists it in `traits`: a Granite multiplier in a "Llama" config is refused.
TRAIT_KEYS = {
    "embedding_multiplier": (None, 1.0), "attention_multiplier": (None,), "residual_multiplier": (None, 1.0),
    "logits_scaling": (None, 1.0), "query_pre_attn_scalar": (None,), "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,), "no_rope_layers": (None,), "no_rope_layer_interval": (None,),
    "num_experts": (None, 0), "num_local_experts": (None, 0), "llama_4_scaling_beta": (None,),
    "mlp_bias": (None, False), "use_bidirectional_attention": (None, False),
}
GEMMA = frozenset({"query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"})

FAMILIES = {
    "LlamaForCausalLM": Family("llama", ("llama",), "Llama 3.1 8B, Llama 3.2 1B/3B, SmolLM2",
                               traits=frozenset({"mlp_bias"})),
    "MistralForCausalLM": Family("mistral", ("mistral",), "Mistral 7B v0.1 (window 4096), v0.2/v0.3",
                                 window_everywhere=True),
    "Qwen2ForCausalLM": Family("qwen2", ("qwen2",), "Qwen2.5 0.5B-72B (yarn), Qwen2 with sliding window",
                               qkv_bias=True),
    "Qwen3ForCausalLM": Family("qwen3", ("qwen3",), "Qwen3 0.6B-32B", qk_norm="head"),
    "Qwen3MoeForCausalLM": Family("qwen3-moe", ("qwen3_moe",), "Qwen3 30B-A3B, 235B-A22B", qk_norm="head",
                                  traits=frozenset({"num_experts", "num_local_experts"})),
    "MixtralForCausalLM": Family("mixtral", ("mixtral",), "Mixtral 8x7B, 8x22B", window_everywhere=True,
                                 traits=frozenset({"num_local_experts"})),
    "Gemma2ForCausalLM": Family("gemma2", ("gemma2",), "Gemma 2 2B/9B/27B", norms="sandwich", gemma_norm=True,
                                traits=GEMMA),
    "Gemma3ForCausalLM": Family("gemma3", ("gemma3_text",), "Gemma 3 1B; 4B-27B via their text tower", qk_norm="head",
                                norms="sandwich", gemma_norm=True, traits=GEMMA),
    "Phi3ForCausalLM": Family("phi3", ("phi3",), "Phi-3/3.5-mini (LongRoPE), Phi-4-mini (partial rotary)",
                              fused=True, window_everywhere=True),
    "Olmo2ForCausalLM": Family("olmo2", ("olmo2",), "OLMo 2 1B/7B/13B", qk_norm="projection", norms="post"),
    "GraniteForCausalLM": Family("granite", ("granite",), "Granite 3.x 2B/8B", traits=frozenset(
        {"embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling", "mlp_bias"})),
    "SmolLM3ForCausalLM": Family("smollm3", ("smollm3",), "SmolLM3 3B (no RoPE every 4th layer)",
                                 traits=frozenset({"no_rope_layers", "no_rope_layer_interval"})),
}
# Multimodal checkpoints whose text tower is a family above: its config is `text_config` (published sparse, the
# config class fills the rest), its weights sit under a prefix (generators.layers.map_state), images are refused.
TEXT_TOWERS = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ["default", "linear", "llama3", "yarn", "longrope"]  # `dynamic` rescales with the length: refused
_REQUIRED_KEYS = ("hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers", "intermediate_size")


@dataclass(frozen=True)
class MoE:
    experts: int
    top_k: int
    norm_top_k: bool
    ffn_dim: int
    sparse: tuple[bool, ...]  # per layer: routed experts (True) or a dense MLP


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
    family: Family = FAMILIES["LlamaForCausalLM"]
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"  # "silu" or "gelu_tanh" (GeGLU)
    embed_scale: float = 1.0  # Gemma sqrt(hidden), Granite embedding_multiplier
    softmax_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    residual_scale: float = 1.0  # Granite residual_multiplier
    logits_divisor: float = 1.0  # Granite logits_scaling
    windows: tuple[int | None, ...] = ()  # per layer: sliding window (keys with position > query - w) or None
    rope_of_layer: tuple[int | None, ...] = ()  # per layer: index into the RoPE table, None: no RoPE
    rotary_dim: int = 0  # leading head dims that are rotated (partial rotary); the rest pass through
    moe: MoE | None = None

    @classmethod
    def from_info(cls, info: ModelInfo) -> tuple["ModelArgs", "RopeTable"]:
        """From a model folder's config.json as ModelInfo read it (resolving fills in defaults: on a copy)."""
        return resolve(copy.deepcopy(info.config), info.config_path)


@dataclass
class RopeTable:
    """The distinct RoPE settings of a model; layers index into them (`ModelArgs.rope_of_layer`)."""

    inv_freq: list[torch.Tensor]  # [R/2] fp32 each, raw (no attention scaling)
    scaling: list[float]  # attention scaling (yarn, longrope mscale) multiplied into cos/sin
    long_inv_freq: list[torch.Tensor | None] = field(default_factory=list)  # LongRoPE's long factors
    switch: int | None = None  # LongRoPE: a forward reaching past this many positions uses the long factors
    describe: list[str] = field(default_factory=list)


def read_config_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(path, "expected a JSON object")
    return config


def family_of(raw: dict, source) -> Family:
    arch = (raw.get("architectures") or ["?"])[0]
    family = FAMILIES.get(arch)
    if family is None:
        hint = "hybrid linear attention keeps a recurrent state, not per-token KV" if "Next" in arch or "3_5" in arch \
            else f"supported: {', '.join(FAMILIES)}"
        raise InputError(source, f"unsupported architecture {arch!r}", hint=hint)
    raw.setdefault("model_type", family.model_types[0])  # a hand-written config may leave it out
    if raw["model_type"] not in family.model_types:
        raise InputError(source, f"architecture {arch} with model_type {raw.get('model_type')!r}: a renamed "
                         f"architecture is refused rather than computed as the nearest family",
                         hint=f"{arch} is written with model_type {', '.join(family.model_types)}")
    return family


def hf_config(raw: dict, source):
    """transformers' config object for config.json as published (either RoPE spelling)."""
    from transformers import AutoConfig

    clean = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map")}
    try:
        return AutoConfig.for_model(clean.pop("model_type"), **clean)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(source, f"transformers cannot read this config ({str(exc).strip().splitlines()[0]})") \
            from None


def text_tower(raw: dict, source) -> dict:
    """config.json of the text model: itself, or a multimodal checkpoint's `text_config` completed by its class."""
    arch = (raw.get("architectures") or ["?"])[0]
    if arch not in TEXT_TOWERS:
        return raw
    text = hf_config(dict(raw.get("text_config") or {}, model_type="gemma3_text"), source).to_dict()
    return {k: v for k, v in text.items() if k not in ("transformers_version", "_name_or_path")} | \
        {"architectures": [TEXT_TOWERS[arch]], "model_type": "gemma3_text"}


def resolve(raw: dict, source) -> tuple[ModelArgs, RopeTable]:
    """ModelArgs and the RoPE table of a config.json, or an InputError naming the trait that is refused."""
    raw = text_tower(raw, source)
    family = family_of(raw, source)
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise InputError(source, f"missing {', '.join(missing)} for a {raw['architectures'][0]} model")
    for key, neutral in TRAIT_KEYS.items():
        if raw.get(key) not in neutral and key not in family.traits:
            raise InputError(source, f"{key}={raw[key]!r} is a trait ragkit does not implement for {family.name}")
    config = hf_config(raw, source)
    n_layers, dim, n_heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or dim // n_heads
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
    for i, kind in enumerate(layer_types):
        if kind not in LAYER_TYPES:
            raise InputError(source, f"layer type {kind!r} (layer {i}) is not implemented",
                             hint="chunk KV reuse needs per-token keys and values in every layer")
    window = getattr(config, "sliding_window", None)
    if family.window_everywhere:
        windows = tuple([window] * n_layers)
    else:
        windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    table, rope_of_layer, rotary_dim = rope_table(config, layer_types, head_dim, source)
    if "no_rope_layers" in family.traits:
        rope_of_layer = tuple(r if use else None for r, use in zip(rope_of_layer, config.no_rope_layers))
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    activations = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if activation not in activations:
        raise InputError(source, f"activation {activation!r} is not implemented", hint="silu or gelu_pytorch_tanh")
    scalar = getattr(config, "query_pre_attn_scalar", None) if "query_pre_attn_scalar" in family.traits else None
    softmax_scale = getattr(config, "attention_multiplier", None) if family.name == "granite" else \
        (scalar ** -0.5 if scalar else None)
    granite = family.name == "granite"
    embed_scale = dim ** 0.5 if family.gemma_norm else float(config.embedding_multiplier) if granite else 1.0
    args = ModelArgs(
        architecture=raw["architectures"][0], family=family, vocab_size=config.vocab_size, dim=dim,
        n_layers=n_layers, n_heads=n_heads, n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim, ffn_dim=config.intermediate_size, norm_eps=getattr(config, "rms_norm_eps", 1e-6),
        qkv_bias=family.qkv_bias or bool(getattr(config, "attention_bias", False)),
        o_bias=bool(getattr(config, "attention_bias", False)) and not family.qkv_bias,  # Qwen2: q/k/v only
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", getattr(config, "tie_word_embeddings", False))),
        activation=activations[activation], embed_scale=embed_scale, softmax_scale=softmax_scale,
        attn_softcap=getattr(config, "attn_logit_softcapping", None) if family.gemma_norm else None,
        final_softcap=getattr(config, "final_logit_softcapping", None) if family.gemma_norm else None,
        residual_scale=float(config.residual_multiplier) if granite else 1.0,
        logits_divisor=float(config.logits_scaling) if granite else 1.0,
        windows=windows, rope_of_layer=tuple(rope_of_layer), rotary_dim=rotary_dim, moe=_moe(config, family, n_layers))
    return args, table


def _moe(config, family: Family, n_layers: int) -> MoE | None:
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if family.name not in ("qwen3-moe", "mixtral") or not experts:
        return None
    step, dense = getattr(config, "decoder_sparse_step", 1) or 1, set(getattr(config, "mlp_only_layers", []) or [])
    sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layers))
    ffn = getattr(config, "moe_intermediate_size", None) or config.intermediate_size  # Mixtral: experts are the MLP
    return MoE(experts, config.num_experts_per_tok, bool(getattr(config, "norm_topk_prob", True)), ffn, sparse)


def rope_table(config, layer_types: list[str], head_dim: int, source) -> tuple[RopeTable, list[int], int]:
    """One RoPE setting per distinct layer type that has its own parameters (Gemma 3's local and global θ)."""
    params = dict(config.rope_parameters or {})
    per_type = bool(params) and set(params) <= set(LAYER_TYPES)
    kinds = sorted(set(layer_types)) if per_type else [None]
    table = RopeTable([], [], [])
    rotary_dims = set()
    for kind in kinds:
        p = dict(params[kind] if per_type else params)
        p.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        rope_type = p.get("rope_type") or p.get("type") or "default"
        if rope_type not in ROPE_TYPES:
            raise InputError(source, f"RoPE type {rope_type!r} changes frequencies with sequence length, so cached "
                             "keys cannot be re-positioned", hint=f"supported: {', '.join(ROPE_TYPES)}")
        partial = float(p.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0))
        rotary_dims.add(int(head_dim * partial))
        inv, scaling, long_inv = _frequencies(config, p, rope_type, int(head_dim * partial), kind)
        table.inv_freq.append(inv)
        table.scaling.append(scaling)
        table.long_inv_freq.append(long_inv)
        if long_inv is not None:
            table.switch = int(p.get("original_max_position_embeddings")
                               or getattr(config, "original_max_position_embeddings"))
        table.describe.append(f"{rope_type} θ={p['rope_theta']:g}" + (f" ×{p['factor']:g}" if p.get("factor") else "")
                              + (f" rotary {int(head_dim * partial)}/{head_dim}" if partial < 1 else ""))
    index = {kind: i for i, kind in enumerate(kinds)}
    return table, [index[kind if per_type else None] for kind in layer_types], rotary_dims.pop()


def _frequencies(config, params: dict, rope_type: str, dim: int, layer_type):
    """(inv_freq, attention_scaling, long inv_freq or None); transformers owns the scaled formulas."""
    if rope_type == "default":
        base = float(params["rope_theta"])
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
        return inv, 1.0, None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {"layer_type": layer_type} if layer_type else {}
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
    long_inv = None
    if rope_type == "longrope":
        switch = int(params.get("original_max_position_embeddings") or config.original_max_position_embeddings)
        long_inv = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=switch + 1, **kwargs)[0].float()
    return inv.float(), float(scaling), long_inv


def rope_frequencies(config: dict, head_dim: int, source: Path | str = "config.json") -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2] fp32, attention_scaling) of a flat config dict (a Llama unless it says otherwise); under
    LongRoPE the short factors."""
    raw = {"model_type": "llama", "hidden_size": head_dim, "num_attention_heads": 1, "head_dim": head_dim, **config}
    hf = hf_config(raw, source)
    table, _, _ = rope_table(hf, ["full_attention"], head_dim, source)
    return table.inv_freq[0], table.scaling[0]
