"""Retrievers: sparse BM25, exact dense, ANN (HNSW, IVF, IVF-PQ), and fusion of any number of them.

Every retriever has one interface (`retrievers.base.Retriever`): index(chunks), add(chunks),
delete(ids), search(queries, k, filter=None) -> one list of Hits per query, save(dir), load(dir).
`build(spec, position)` makes one from a `[[retrieval.retrievers]]` TOML table; `fuse`
combines their result lists.
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

from ragkit.errors import ConfigError
from retrievers.base import Retriever
from retrievers.fusion import fuse

_TYPES = ["bm25", "dense", "hnsw", "ivf", "ivfpq"]


def _classes(kind: str):
    if kind == "bm25":
        from retrievers.bm25 import BM25Params, BM25Retriever

        return BM25Retriever, BM25Params
    from retrievers import dense

    return {"dense": (dense.DenseRetriever, dense.DenseParams), "hnsw": (dense.HNSWRetriever, dense.HNSWParams),
            "ivf": (dense.IVFRetriever, dense.IVFParams), "ivfpq": (dense.IVFPQRetriever, dense.IVFPQParams)}[kind]


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if typ is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise ConfigError(key, f"expected {typ.__name__}, got {value!r}")


def parse_params(params_class: type, spec: dict[str, Any], prefix: str) -> Any:
    """Validate one retriever table against its parameter dataclass."""
    hints = get_type_hints(params_class)
    fields = {f.name for f in dataclasses.fields(params_class)}
    values = {}
    for name, value in spec.items():
        if name == "type":
            continue
        key = f"{prefix}.{name}"
        if name not in fields:
            raise ConfigError(key, "unknown parameter", allowed=sorted(fields))
        value = _coerce(key, value, hints[name])
        allowed = params_class.choices.get(name)
        if allowed is not None and value not in allowed:
            raise ConfigError(key, f"unknown value {value!r}", allowed=allowed)
        if name in params_class.positive and value <= 0:
            raise ConfigError(key, f"must be > 0, got {value}")
        if name in params_class.unit_interval and not 0 <= value <= 1:
            raise ConfigError(key, f"must be in [0, 1], got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")
        values[name] = value
    return params_class(**values)


def build(spec: dict[str, Any], position: int = 0) -> Retriever:
    """An empty retriever for one `[[retrieval.retrievers]]` table: call index() or load() next."""
    prefix = f"retrieval.retrievers[{position}]"
    kind = spec.get("type")
    if kind not in _TYPES:
        raise ConfigError(f"{prefix}.type", f"unknown retriever {kind!r}", allowed=_TYPES)
    retriever_class, params_class = _classes(kind)
    params = parse_params(params_class, spec, prefix)
    if kind == "bm25":
        return retriever_class(params)
    return retriever_class(params, key=prefix)


__all__ = ["Retriever", "build", "fuse"]
