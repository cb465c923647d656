"""Second-stage rerankers: reorder the top `depth` documents of a ranking by a finer score.

A reranker scores (query, candidate) pairs; a candidate is the document's best-matching chunk. Kinds
(one `[[rerank.stages]]` table each, run in order, each over the previous stage's output):

    cross-encoder   a local sentence-transformers / HF sequence-classification folder (CrossEncoder),
                    pairs scored in batches
    bi-encoder      a sentence-transformers encoder (default all-MiniLM-L6-v2): cosine of query and passage
    llm-pointwise   the local decoder's yes/no logit margin on the chunk's cached KV (generators.pointwise)
    llm-listwise    RankGPT sliding windows through the [llm] (generators.listwise)

This module owns the stage tables (parameters, validation: `check_stages`) and the encoder kinds; the
LLM kinds live in generators and are handed to `build` by the pipeline, since they need its decoder or
endpoint. Documents below `depth` keep their order under the reranked ones. The reranked ranking's
scores are rank-based (strictly decreasing), so evaluation never reorders tied scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol

from ragkit.errors import ConfigError, InputError
from ragkit.types import Chunk, Hit
from retrievers import parse_params
from retrievers.base import indexed_text


class Reranker(Protocol):
    def score(self, query: str, chunks: list[Chunk]) -> list[float]:
        """One relevance score per chunk (higher is better), in order."""


@dataclass
class StageParams:
    depth: int = 20
    choices: ClassVar[dict[str, list[str]]] = {}
    positive: ClassVar[tuple[str, ...]] = ("depth",)
    unit_interval: ClassVar[tuple[str, ...]] = ()


@dataclass
class CrossEncoderParams(StageParams):
    model: str = ""  # a local folder
    batch_size: int = 32
    max_length: int = 512
    positive: ClassVar[tuple[str, ...]] = ("depth", "batch_size", "max_length")


@dataclass
class BiEncoderParams(StageParams):
    model: str = "all-MiniLM-L6-v2"
    batch_size: int = 64
    max_length: int = 256
    positive: ClassVar[tuple[str, ...]] = ("depth", "batch_size", "max_length")


@dataclass
class PointwiseParams(StageParams):
    # Reuse each candidate's cached chunk KV (`prefix` mode); false computes every prompt in full.
    cached: bool = True
    # Show the document's title after the passage (its tokens are then computed for every candidate).
    title: bool = False
    batch_size: int = 32  # candidates of a query scored in one forward
    positive: ClassVar[tuple[str, ...]] = ("depth", "batch_size")


@dataclass
class ListwiseParams(StageParams):
    window: int = 20
    step: int = 10
    max_tokens: int = 128  # reply budget per window
    chars: int = 600  # characters of each passage shown to the LLM
    positive: ClassVar[tuple[str, ...]] = ("depth", "window", "step", "max_tokens", "chars")


STAGES: dict[str, type[StageParams]] = {"cross-encoder": CrossEncoderParams, "bi-encoder": BiEncoderParams,
                                        "llm-pointwise": PointwiseParams, "llm-listwise": ListwiseParams}


def stage_params(spec: Any, position: int, source: str | None = None) -> tuple[str, StageParams]:
    key = f"rerank.stages[{position}]"
    if not isinstance(spec, dict) or spec.get("type") not in STAGES:
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise ConfigError(f"{key}.type", f"unknown reranker {kind!r}", allowed=list(STAGES), source=source)
    try:
        params = parse_params(STAGES[spec["type"]], spec, key)
    except ConfigError as exc:
        raise ConfigError(*exc._args[:3], source=source) from None
    if isinstance(params, ListwiseParams) and params.step > params.window:
        raise ConfigError(f"{key}.step", f"must be <= window ({params.window}), or passages are skipped",
                          source=source)
    return spec["type"], params


def check_stages(stages: list[Any], source: str | None = None) -> None:
    for position, spec in enumerate(stages):
        stage_params(spec, position, source)


def build(spec: dict[str, Any], position: int,
          llm_kinds: Mapping[str, Callable[[StageParams], Reranker]]) -> tuple[Reranker, StageParams]:
    """The reranker of one stage table; `llm_kinds` makes the LLM kinds (type -> factory of params)."""
    kind, params = stage_params(spec, position)
    if kind == "cross-encoder":
        return CrossEncoderReranker(params, f"rerank.stages[{position}].model"), params
    if kind == "bi-encoder":
        return BiEncoderReranker(params, f"rerank.stages[{position}].model"), params
    return llm_kinds[kind](params), params


def rerank(reranker: Reranker, query: str, hits: list[Hit], depth: int, chunk_of: Callable[[str], Chunk]) -> list[Hit]:
    """`hits` with the top `depth` reordered by the reranker's scores of their chunks (see `reorder`)."""
    head = hits[:depth]
    return reorder(hits, reranker.score(query, [chunk_of(h.id) for h in head]) if head else [])


def reorder(hits: list[Hit], scores: list[float]) -> list[Hit]:
    """The first len(scores) hits sorted by score (ties keep their order), the rest below in their order;
    the new scores are n, n-1, ..., 1."""
    head, rest = hits[:len(scores)], hits[len(scores):]
    order = sorted(range(len(head)), key=lambda i: (-scores[i], i))
    ranked = [head[i].id for i in order] + [h.id for h in rest]
    return [Hit(doc_id, float(len(ranked) - i), i + 1) for i, doc_id in enumerate(ranked)]


class CrossEncoderReranker:
    def __init__(self, params: CrossEncoderParams, key: str):
        folder = Path(params.model).expanduser()
        if not params.model or not (folder / "config.json").is_file():
            raise InputError(folder, "not a cross-encoder folder (no config.json)",
                             hint=f"set {key} to a local sentence-transformers or HF sequence-classification folder")
        from sentence_transformers import CrossEncoder

        self.params = params
        self.model = CrossEncoder(str(folder), max_length=params.max_length, local_files_only=True)

    def score(self, query: str, chunks: list[Chunk]) -> list[float]:
        pairs = [(query, indexed_text(c)) for c in chunks]
        scores = self.model.predict(pairs, batch_size=self.params.batch_size, show_progress_bar=False)
        # one logit per pair, or (with two labels) the "relevant" class's probability
        return [float(s[-1]) if getattr(s, "ndim", 0) else float(s) for s in scores]


class BiEncoderReranker:
    def __init__(self, params: BiEncoderParams, key: str):
        from retrievers.encoder import Encoder, resolve_model

        self.encoder = Encoder(resolve_model(params.model, key), batch_size=params.batch_size,
                               max_length=params.max_length)

    def score(self, query: str, chunks: list[Chunk]) -> list[float]:
        q = self.encoder.encode([query], "query")[0]
        docs = self.encoder.encode([indexed_text(c) for c in chunks], "document")
        return [float(s) for s in docs @ q]

