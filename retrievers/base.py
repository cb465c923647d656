"""What every retriever shares: chunk ids per slot, metadata filters, deletions, manifests.

A retriever stores chunks in slots 0..n-1. Subclasses implement the scoring; this class keeps
the slot -> chunk id map, the metadata columns and the live mask, and turns a search into
"score the allowed slots, then deterministic top-k".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np

from ragkit.errors import IndexMismatchError
from ragkit.storage import atomic_write_json
from ragkit.types import Chunk, Hit
from retrievers.filters import MetadataColumns
from retrievers.topk import id_ranks

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def indexed_text(chunk: Chunk) -> str:
    """The text a retriever sees: title and body, as BEIR/Pyserini index them."""
    return f"{chunk.title}\n{chunk.text}" if chunk.title else chunk.text


class Retriever:
    """index / add / delete / search / save / load over chunks; subclasses score."""

    type: ClassVar[str]
    # Parameters baked into a saved index; a load with other values is a mismatch.
    index_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Any):
        self.params = params
        self._reset()

    # -- public interface -------------------------------------------------------------------

    def index(self, chunks: Iterable[Chunk]) -> None:
        """Build from scratch."""
        self._reset()
        self.add(chunks)

    def add(self, chunks: Iterable[Chunk]) -> None:
        """Add chunks; a chunk whose id is already indexed replaces the old one."""
        latest = {chunk.id: chunk for chunk in chunks}
        if not latest:
            return
        self.delete([cid for cid in latest if cid in self.slot_of])
        batch = list(latest.values())
        self._add_texts([indexed_text(c) for c in batch])
        self._register([c.id for c in batch], [c.metadata for c in batch])

    def delete(self, ids: Iterable[str]) -> int:
        """Remove chunks by id; unknown ids are ignored. Returns how many were removed."""
        slots = [self.slot_of.pop(cid) for cid in set(ids) if cid in self.slot_of]
        if slots:
            self.live[slots] = False
            self._deleted(np.asarray(slots))
        return len(slots)

    def __len__(self) -> int:
        return len(self.slot_of)

    def search(self, queries: Sequence[str], k: int, filter: Mapping[str, Any] | None = None) -> list[list[Hit]]:
        """Top-k chunk hits per query (a batch; one query is a batch of one)."""
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query as [query]")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = list(queries)
        if not self.slot_of:
            if filter:
                self.metadata.mask(filter)  # still reports an unknown field
            return [[] for _ in queries]
        allowed = self._allowed(filter)
        slot_lists, score_lists = self._search(queries, k, allowed)
        return [self._hits(slots, scores) for slots, scores in zip(slot_lists, score_lists)]

    def save(self, directory: str | Path) -> None:
        """Write into an existing (empty) folder; the manifest goes last."""
        directory = Path(directory)
        self._save_arrays(directory)
        atomic_write_json(directory / "ids.json", self.ids)
        atomic_write_json(directory / "metadata.json", self.metadata.columns)
        np.save(directory / "live.npy", self.live)
        atomic_write_json(directory / MANIFEST, {
            "type": self.type, "format_version": FORMAT_VERSION, "count": len(self.ids),
            "params": dataclasses.asdict(self.params),
        })

    def load(self, directory: str | Path) -> None:
        """Read a folder written by save(); raise IndexMismatchError if it was built differently."""
        directory = Path(directory)
        manifest = self._check_manifest(directory)
        self._reset()
        self.ids = json.loads((directory / "ids.json").read_text(encoding="utf-8"))
        self.live = np.load(directory / "live.npy")
        if len(self.ids) != manifest["count"] or len(self.live) != len(self.ids):
            raise IndexMismatchError(f"{directory}: ids.json does not match the manifest; rebuild the index")
        self.slot_of = {cid: slot for slot, cid in enumerate(self.ids) if self.live[slot]}
        columns = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
        self.metadata = MetadataColumns(columns, size=len(self.ids))
        self._load_arrays(directory, manifest)

    # -- helpers for subclasses -------------------------------------------------------------

    @property
    def id_rank(self) -> np.ndarray:
        if self._id_rank is None:
            self._id_rank = id_ranks(self.ids)
        return self._id_rank

    def _reset(self) -> None:
        self.ids: list[str] = []
        self.slot_of: dict[str, int] = {}
        self.live = np.zeros(0, dtype=bool)
        self.metadata = MetadataColumns()
        self._id_rank: np.ndarray | None = None

    def _register(self, ids: list[str], metadata: list[Mapping[str, Any]]) -> None:
        """Record the chunk ids and metadata of slots the subclass has just appended."""
        first = len(self.ids)
        self.ids.extend(ids)
        self.slot_of.update((cid, first + i) for i, cid in enumerate(ids))
        self.live = np.concatenate([self.live, np.ones(len(ids), dtype=bool)])
        self.metadata.append(metadata)
        self._id_rank = None

    def _allowed(self, filter: Mapping[str, Any] | None) -> np.ndarray | None:
        """Mask of slots a search may return, or None when every slot may appear."""
        mask = self.metadata.mask(filter) if filter else None
        if len(self.slot_of) < len(self.ids):
            mask = self.live if mask is None else mask & self.live
        return mask

    def _compact(self) -> np.ndarray:
        """Drop dead slots from the shared state; returns the keep mask for subclass arrays."""
        keep = self.live.copy()
        self.ids = [cid for cid, alive in zip(self.ids, keep) if alive]
        self.slot_of = {cid: slot for slot, cid in enumerate(self.ids)}
        self.metadata.keep(keep)
        self.live = np.ones(len(self.ids), dtype=bool)
        self._id_rank = None
        return keep

    def _hits(self, slots: np.ndarray, scores: np.ndarray) -> list[Hit]:
        ids = self.ids
        return [Hit(ids[s], float(v), rank) for rank, (s, v) in enumerate(zip(slots.tolist(), scores.tolist()), 1)]

    def _check_manifest(self, directory: Path) -> dict[str, Any]:
        path = directory / MANIFEST
        if not path.is_file():
            raise IndexMismatchError(f"{directory}: no {MANIFEST}; not a ragkit {self.type} index (run `ragkit index`)")
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("type") != self.type:
            raise IndexMismatchError(f"{directory}: holds a {manifest.get('type')!r} index, the config asks for "
                                     f"{self.type!r}; re-run `ragkit index`")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IndexMismatchError(f"{directory}: index format version {manifest.get('format_version')}, this "
                                     f"ragkit reads version {FORMAT_VERSION}; re-run `ragkit index`")
        saved = manifest.get("params", {})
        current = dataclasses.asdict(self.params)
        for name in self.index_params:
            if saved.get(name) != current[name]:
                raise IndexMismatchError(f"{directory}: index built with {name}={saved.get(name)!r}, the config "
                                         f"says {current[name]!r}; re-run `ragkit index`")
        return manifest

    # -- subclass hooks ---------------------------------------------------------------------

    def _add_texts(self, texts: list[str]) -> None:
        raise NotImplementedError

    def _deleted(self, slots: np.ndarray) -> None:
        raise NotImplementedError

    def _search(self, queries: list[str], k: int, allowed: np.ndarray | None) -> tuple[list, list]:
        raise NotImplementedError

    def _save_arrays(self, directory: Path) -> None:
        raise NotImplementedError

    def _load_arrays(self, directory: Path, manifest: dict[str, Any]) -> None:
        raise NotImplementedError
