"""Sharded retrievers: built part by part within a memory budget, searched shard by shard, merged exactly.

Layout of one sharded retriever folder:
    shards.json                 {"format_version", "type", "params", "count", "shards": [{"dir", "count"}]},
                                written last: a folder without it is not an index
    shard-00000/ ...            one complete shard over a contiguous run of chunks
BM25 shards are `BM25Retriever`s made with the whole corpus's statistics (gathered in a first
pass over every part), so they score exactly as one index. Dense shards (`dense`, `hnsw`) are
the ordinary retrievers over their rows' embeddings; `ivf` / `ivfpq` shards are on-disk IVF
indexes (`retrievers.ondisk`) sharing one trained quantizer. Embeddings come from a resumable
store (`retrievers.embedding_store`).

Each shard returns its top k by (score descending, id ascending); the k best of their union in
that order are the k best of the corpus, so a sharded search ranks like one index (exactly for
`bm25` and `dense`; for ANN shards the union of candidates is at least as good).

Where the work runs is a `Runner` (this process, or Ray tasks: `retrievers.ray_backend`), and
where shards are searched is a shard pool (in this process, or one Ray actor per shard).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from ragkit.errors import ConfigError, IndexMismatchError
from ragkit.storage import atomic_write_json
from ragkit.types import Chunk, Hit
from retrievers.base import indexed_text

FORMAT_VERSION = 1
MANIFEST = "shards.json"
DENSE_KINDS = ("dense", "hnsw", "ivf", "ivfpq")
BM25_BYTES_PER_POSTING = 100  # estimate: tokens as Python ints plus the COO -> CSC build of one shard
DIM_GUESS = 1024  # sizes embedding parts before the model is loaded; wider than most embedders


class Runner(Protocol):
    """Runs `fn(item, *shared)` for every item, maybe in parallel; results in item order.

    `desc` and `rows` (documents per item) label a progress bar in documents per second.
    """

    def share(self, value: Any) -> Any:
        """A handle to pass as a shared argument of many calls (sent once where that matters)."""

    def map(self, fn: Callable, items: Sequence, *shared: Any, desc: str = "", rows: Sequence[int] = ()) -> list: ...

    def embed(self, store: Any, texts: Sequence[str], spec: dict[str, Any], position: int, part_rows: int) -> None:
        """Fill the embedding store with the document embeddings of `texts` that it lacks."""


class LocalRunner:
    """Every step in this process, one after another (the default backend)."""

    def __init__(self, progress: bool = False):
        self.progress = progress

    def share(self, value: Any) -> Any:
        return value

    def map(self, fn: Callable, items: Sequence, *shared: Any, desc: str = "", rows: Sequence[int] = ()) -> list:
        from tqdm.auto import tqdm

        sizes = list(rows) or [1] * len(items)
        with tqdm(total=sum(sizes), desc=desc, unit="doc", disable=not self.progress, dynamic_ncols=True) as bar:
            out = []
            for item, size in zip(items, sizes):
                out.append(fn(item, *shared))
                bar.update(size)
        return out

    def embed(self, store: Any, texts: Sequence[str], spec: dict[str, Any], position: int, part_rows: int) -> None:
        import retrievers

        encoder = retrievers.build(spec, position).encoder
        store.fill(texts, lambda batch: encoder.encode(batch, "document"), part_rows, progress=self.progress)


@dataclass
class BuildPlan:
    """How to build: at least `shards` shards, each within `memory_budget` bytes, steps run by `runner`.

    The build records each stage's wall seconds in `stage_seconds` (for progress reports and benchmarks)."""

    shards: int = 1
    memory_budget: int = 4 << 30
    runner: Runner = field(default_factory=LocalRunner)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, stage: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.stage_seconds[stage] = round(time.perf_counter() - start, 2)
        return out


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous, near-equal [start, end) ranges covering 0..n (none empty unless n is 0)."""
    parts = max(1, min(parts, n)) if n else 1
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def shard_dir(folder: Path, number: int) -> Path:
    return folder / f"shard-{number:05d}"


# -- building -------------------------------------------------------------------------------


def build(spec: dict[str, Any], position: int, chunks: Sequence[Chunk], folder: Path, plan: BuildPlan,
          embeddings: Any = None) -> dict[str, Any]:
    """Build the sharded form of one `[[retrieval.retrievers]]` table into the empty `folder`.

    Dense kinds need `embeddings`: a finished `EmbeddingStore` whose rows are the chunks' in order.
    """
    kind = spec.get("type")
    if kind in DENSE_KINDS:
        return build_from_embeddings(spec, position, [c.id for c in chunks], folder, plan, embeddings)
    if kind != "bm25":
        raise ConfigError(f"retrieval.retrievers[{position}].type", f"cannot shard {kind!r}",
                          allowed=["bm25", *DENSE_KINDS])
    return _write_manifest(spec, position, folder, _build_bm25(spec, position, chunks, folder, plan))


def embed(spec: dict[str, Any], position: int, chunks: Sequence[Chunk], plan: BuildPlan):
    """The resumable embedding store of these chunks: <cache_dir>/stores/<texts + encoder fingerprint>/."""
    import retrievers
    from retrievers.embedding_store import EmbeddingStore, rows_per_part, texts_fingerprint

    probe = retrievers.build(spec, position)
    texts = [indexed_text(c) for c in chunks]
    fingerprint = texts_fingerprint(texts, probe.encoder.fingerprint())
    store = EmbeddingStore(Path(probe.params.cache_dir) / "stores" / fingerprint, fingerprint)
    plan.runner.embed(store, texts, spec, position, rows_per_part(plan.memory_budget, DIM_GUESS))
    return store


def build_from_embeddings(spec: dict[str, Any], position: int, ids: Sequence[str], folder: Path, plan: BuildPlan,
                          embeddings: Any) -> dict[str, Any]:
    """A sharded dense index over a finished `EmbeddingStore` whose rows are `ids`, in order."""
    from retrievers import ondisk

    if embeddings is None or embeddings.count != len(ids):
        raise ValueError("dense shards need the embeddings of every chunk")
    builder = ondisk.build_ivf_shards if spec["type"] in ("ivf", "ivfpq") else _build_dense
    return _write_manifest(spec, position, folder, builder(spec, position, ids, folder, plan, embeddings))


def _write_manifest(spec: dict[str, Any], position: int, folder: Path, counts: list[int]) -> dict[str, Any]:
    import retrievers

    manifest = {"format_version": FORMAT_VERSION, "type": spec["type"], "count": sum(counts),
                "params": asdict(retrievers.build(spec, position).params),
                "shards": [{"dir": shard_dir(folder, i).name, "count": c} for i, c in enumerate(counts)]}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def _bm25_stats(bounds: tuple[int, int], chunks: Sequence[Chunk], spec: dict, position: int):
    import retrievers

    start, end = bounds
    return retrievers.build(spec, position).gather_stats(indexed_text(c) for c in chunks[start:end])


def _bm25_shard(job: tuple[int, int, int, str], chunks: Sequence[Chunk], spec: dict, position: int, stats) -> int:
    import retrievers
    from retrievers.bm25 import BM25Retriever

    number, start, end, folder = job
    shard = BM25Retriever(retrievers.build(spec, position).params, corpus=stats)
    shard.index(chunks[start:end])
    out = shard_dir(Path(folder), number)
    out.mkdir()
    shard.save(out)
    return len(shard)


def _build_bm25(spec: dict, position: int, chunks: Sequence[Chunk], folder: Path, plan: BuildPlan) -> list[int]:
    """Pass 1 gathers document frequencies and lengths per part; pass 2 builds each shard with their sum."""
    from retrievers.sparse import CorpusStats

    runner = plan.runner
    chunks_ref = runner.share(chunks)
    parts = split(len(chunks), plan.shards)
    stats = CorpusStats.merge(plan.timed("statistics", runner.map, _bm25_stats, parts, chunks_ref, spec, position,
                                         desc="bm25 statistics", rows=[end - start for start, end in parts]))
    postings_per_chunk = stats.total_len / max(stats.n_docs, 1) + 1
    rows_in_budget = max(1, int(plan.memory_budget / 2 / (postings_per_chunk * BM25_BYTES_PER_POSTING)))
    parts = split(len(chunks), max(plan.shards, math.ceil(len(chunks) / rows_in_budget)))
    jobs = [(i, start, end, str(folder)) for i, (start, end) in enumerate(parts)]
    return plan.timed("shards", runner.map, _bm25_shard, jobs, chunks_ref, spec, position, runner.share(stats),
                      desc="bm25 shards", rows=[end - start for start, end in parts])


def _dense_shard(job: tuple[int, int, int, str], ids: Sequence[str], spec: dict, position: int, store_dir: str) -> int:
    import retrievers
    from retrievers.embedding_store import EmbeddingStore

    number, start, end, folder = job
    shard = retrievers.build(spec, position)
    shard.add_vectors(ids[start:end], EmbeddingStore.open(store_dir).rows(start, end))
    out = shard_dir(Path(folder), number)
    out.mkdir()
    shard.save(out)
    return len(shard)


def _build_dense(spec: dict, position: int, ids: Sequence[str], folder: Path, plan: BuildPlan,
                 embeddings) -> list[int]:
    """Exact / HNSW shards: each holds its rows' vectors in memory, so a shard fits the budget."""
    rows_in_budget = max(1, plan.memory_budget // 2 // (embeddings.dim * 4 * 2))
    parts = split(len(ids), max(plan.shards, math.ceil(len(ids) / rows_in_budget)))
    jobs = [(i, start, end, str(folder)) for i, (start, end) in enumerate(parts)]
    return plan.runner.map(_dense_shard, jobs, plan.runner.share(ids), spec, position, str(embeddings.directory),
                           desc=f"indexing {spec['type']}", rows=[end - start for start, end in parts])


# -- loading and searching ------------------------------------------------------------------


def read_manifest(folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexMismatchError(f"{path}: unreadable sharded index manifest ({exc}); re-run `ragkit index`") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexMismatchError(f"{folder}: sharded index format {manifest.get('format_version')}, this ragkit "
                                 f"reads {FORMAT_VERSION}; re-run `ragkit index`")
    if manifest.get("type") != spec.get("type"):
        raise IndexMismatchError(f"{folder}: holds a sharded {manifest.get('type')!r} index, the config asks for "
                                 f"{spec.get('type')!r}; re-run `ragkit index`")
    return manifest


def open_shard(spec: dict[str, Any], position: int, folder: str | Path):
    """One shard, loaded in this process (also what a Ray shard actor holds)."""
    import retrievers

    kind = spec["type"]
    if kind in ("ivf", "ivfpq"):
        from retrievers.ondisk import OnDiskIVF

        return OnDiskIVF.load(Path(folder), spec, position)
    if kind == "bm25":
        from retrievers.bm25 import BM25Retriever

        shard = BM25Retriever(retrievers.build(spec, position).params)
    else:
        shard = retrievers.build(spec, position)
    shard.load(folder)
    return shard


class LocalShards:
    """The shards of one retriever, held and searched in this process, one after another."""

    def __init__(self, spec: dict[str, Any], position: int, folders: list[Path]):
        self.shards = [open_shard(spec, position, f) for f in folders]

    def call(self, method: str, *args: Any) -> list:
        return [getattr(shard, method)(*args) for shard in self.shards]


def merge_hits(per_shard: Sequence[list[Hit]], k: int) -> list[Hit]:
    """The k best of several shards' top-k lists: score descending, then id ascending."""
    best = sorted((hit for hits in per_shard for hit in hits), key=lambda h: (-h.score, h.id))[:k]
    return [Hit(h.id, h.score, rank) for rank, h in enumerate(best, 1)]


class ShardedRetriever:
    """search(queries, k, filter) over every shard of one retriever; dense queries are encoded once here."""

    def __init__(self, spec: dict[str, Any], position: int, folder: Path, pool: Any = None):
        import retrievers

        self.spec, self.manifest = spec, read_manifest(folder, spec)
        self.type = spec["type"]
        folders = [folder / s["dir"] for s in self.manifest["shards"]]
        self.encoder = retrievers.build(spec, position).encoder if self.type in DENSE_KINDS else None
        self.pool = pool(spec, position, folders) if pool else LocalShards(spec, position, folders)

    def __len__(self) -> int:
        return self.manifest["count"]

    def search(self, queries: Sequence[str], k: int, filter: Mapping[str, Any] | None = None) -> list[list[Hit]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query as [query]")
        if self.encoder is not None:
            return self.search_vectors(self.encoder.encode(list(queries), "query"), k, filter)
        return self._merge(self.pool.call("search", list(queries), k, filter), k)

    def search_vectors(self, query_vectors: np.ndarray, k: int, filter: Mapping[str, Any] | None = None
                       ) -> list[list[Hit]]:
        vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)
        return self._merge(self.pool.call("search_vectors", vectors, k, filter), k)

    @staticmethod
    def _merge(per_shard: list[list[list[Hit]]], k: int) -> list[list[Hit]]:
        return [merge_hits(lists, k) for lists in zip(*per_shard)]


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (no second copy on disk), else a copy."""
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copyfile(source, target)
