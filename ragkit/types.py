"""ragkit's data model: the only ragkit module that components (retrievers, chunk_cache,
generators, eval) import, together with `ragkit.errors`.

Value objects are small and immutable so that they can be hashed, cached and shared
between threads without copying.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import numpy as np


@dataclass(frozen=True)
class Document:
    """One corpus entry as read from disk."""

    id: str
    text: str
    title: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)


def token_hash(token_ids: Iterable[int]) -> str:
    """Content hash of a token sequence; the chunk cache keys KV entries on it."""
    arr = np.asarray(list(token_ids), dtype="<i4")
    return hashlib.sha256(arr.tobytes()).hexdigest()[:32]


@dataclass(frozen=True)
class Chunk:
    """A token-bounded piece of a document.

    `id` is `doc_id#n` (n counts from 0 within the document), `span` the character range
    of `text` in the document text, `token_ids` the generator tokenizer's ids of `text`
    (tokenised alone, without special tokens), `content_hash` = token_hash(token_ids).
    """

    id: str
    doc_id: str
    text: str
    token_ids: tuple[int, ...]
    span: tuple[int, int]
    content_hash: str
    title: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @staticmethod
    def make_id(doc_id: str, n: int) -> str:
        return f"{doc_id}#{n}"

    @staticmethod
    def doc_id_of(chunk_id: str) -> str:
        return chunk_id.rsplit("#", 1)[0]


@dataclass(frozen=True)
class Query:
    """A question, with what the benchmark protocol needs to score it."""

    id: str
    text: str
    excluded_ids: frozenset[str] = frozenset()
    answers: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    choices: tuple[str, ...] = ()  # closed-form answers allowed for this query (over generator.choices)


@dataclass(frozen=True)
class Hit:
    """One ranked result: a chunk or document id with its score and 1-based rank."""

    id: str
    score: float
    rank: int


def rank_hits(scores: Mapping[str, float], k: int | None = None) -> list[Hit]:
    """Sort by score descending, ties broken by id ascending, so rankings are reproducible."""
    ordered = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    if k is not None:
        ordered = ordered[:k]
    return [Hit(doc_id, float(score), rank) for rank, (doc_id, score) in enumerate(ordered, 1)]


class Qrels(Mapping[str, Mapping[str, int]]):
    """Relevance judgements: query id -> {doc id: grade}."""

    def __init__(self, judgements: Mapping[str, Mapping[str, int]]):
        self._data = {str(q): {str(d): int(g) for d, g in docs.items()} for q, docs in judgements.items()}

    def __getitem__(self, qid: str) -> Mapping[str, int]:
        return self._data[qid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def relevant(self, qid: str) -> set[str]:
        return {d for d, g in self._data.get(qid, {}).items() if g > 0}

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {q: dict(d) for q, d in self._data.items()}


class Run(Mapping[str, list[Hit]]):
    """A ranked result list per query: query id -> hits, best first."""

    def __init__(self, rankings: Mapping[str, list[Hit]], name: str = "ragkit"):
        self._data = {str(q): list(hits) for q, hits in rankings.items()}
        self.name = name

    def __getitem__(self, qid: str) -> list[Hit]:
        return self._data[qid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def scores(self) -> dict[str, dict[str, float]]:
        """The pytrec_eval shape: query id -> {doc id: score}."""
        return {q: {h.id: h.score for h in hits} for q, hits in self._data.items()}

    def to_trec_lines(self) -> Iterator[str]:
        for qid, hits in self._data.items():
            for hit in hits:
                yield f"{qid} Q0 {hit.id} {hit.rank} {hit.score:.6f} {self.name}\n"
