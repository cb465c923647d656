"""What ragkit reads from a model (`ragkit models [PATH]`): the supported families, or for a folder or
GGUF file its family, layers, windows, RoPE per layer, dtype and cache fingerprint — or why it is refused
(an InputError naming the trait, before any weight is read or dequantised)."""

from __future__ import annotations

from pathlib import Path

from generators.families import FAMILIES, ModelArgs, RopeTable, resolve


def families_table() -> list[str]:
    """One line per supported architecture: family, traits, example checkpoints."""
    lines = []
    for arch, family in FAMILIES.items():
        traits = [t for t, on in (("q/k norm " + str(family.qk_norm), family.qk_norm), ("fused qkv", family.fused),
                                  (f"{family.norms} norms", family.norms != "pre"), ("(1+w) norm", family.gemma_norm),
                                  ("window on every layer", family.window_everywhere)) if on]
        traits += sorted(family.traits)
        lines.append(f"{family.name:10} {arch:22} {', '.join(traits) or '-'}  [{family.examples}]")
    return lines


def describe(path: str) -> list[str]:
    """Lines saying what ragkit reads from `path` (a model folder, a .gguf file or a bundled name)."""
    import torch

    from generators.weights import BUNDLED, gguf_config, model_fingerprint, model_info

    source = Path(path).expanduser()
    if path not in BUNDLED and source.suffix == ".gguf":
        args, rope = resolve(gguf_config(source), source)
        return _lines(args, rope, "") + ["fingerprint  (after conversion on first use)"]
    info = model_info(path, "PATH")
    args, rope = ModelArgs.from_info(info)
    return _lines(args, rope, info.dtype) + [f"fingerprint  {model_fingerprint(info, torch.float32)} (float32)"]


def _lines(args: ModelArgs, rope: RopeTable, dtype: str) -> list[str]:
    dtype = dtype or "?"
    lines = [f"family       {args.family.name} ({args.architecture})",
             f"layers       {args.n_layers} x {args.n_heads} heads ({args.n_kv_heads} KV) of {args.head_dim}, "
             f"hidden {args.dim}, vocab {args.vocab_size}, {'tied' if args.tie_embeddings else 'untied'} head",
             f"dtype        {dtype} on disk"]
    windows = _runs(args.windows)
    lines.append("window       " + "; ".join(f"layers {r}: {w or 'none'}" for w, r in windows))
    by_rope = _runs(args.rope_of_layer)
    lines.append("rope         " + "; ".join(f"layers {r}: {rope.describe[k] if k is not None else 'none'}"
                                             for k, r in by_rope)
                 + (f" (long factors past {rope.switch} positions)" if rope.switch else ""))
    if args.moe is not None:
        lines.append(f"experts      {args.moe.experts}, top {args.moe.top_k}, "
                     f"{sum(args.moe.sparse)} of {args.n_layers} layers routed")
    return lines


def _runs(values) -> list[tuple[object, str]]:
    """Per distinct value, the layers that have it ("0-4,6")."""
    layers: dict[object, list[int]] = {}
    for i, value in enumerate(values):
        layers.setdefault(value, []).append(i)
    out = []
    for value, idx in layers.items():
        spans, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None]):
            if b != a + 1:
                spans.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        out.append((value, ",".join(spans)))
    return out
