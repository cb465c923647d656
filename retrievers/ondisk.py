"""IVF / IVF-PQ shards whose inverted lists live on disk, with candidates re-scored exactly.

The build follows FAISS's recipe for indexes larger than RAM: train the coarse quantizer (and
the product quantizer) once on a sample of the embedding store; add the vectors batch by batch
to copies of the empty trained index, each batch saved as a block; merge the blocks' lists into
one file (`faiss.contrib.ondisk.merge_ondisk`). Every shard of a sharded index uses the same
trained index, so shard builds are independent (Ray tasks add them in parallel). A search keeps
only the centroids in RAM and memory-maps the lists it probes; its candidates (k * rerank for
IVF-PQ) are re-scored with the exact inner product against the stored vectors.

Layout of one shard folder:
    ondisk.json        {"type", "count", "dim", "vectors": [file names], "skip"}, written last
    index.faiss        the IVF index; its lists point to lists.ivfdata in the same folder
    lists.ivfdata      inverted lists: codes and shard row numbers
    ids.npy            chunk id per row (UTF-8, fixed width; bytes order = str order)
    vectors-00000.npy  the embedding store's parts over this shard's rows (hard links where
                       possible); row r of the shard is row r + skip of their concatenation
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import faiss
import numpy as np

from ragkit.errors import ConfigError, IndexMismatchError
from ragkit.storage import atomic_write_json
from ragkit.types import Hit
from retrievers.dense import TIE_MARGIN
from retrievers.embedding_store import EmbeddingStore, rows_per_part, take_rows
from retrievers.shards import BuildPlan, link_or_copy, shard_dir, split

MANIFEST = "ondisk.json"
# k-means iterations of the coarse quantizer (faiss's default is 25): on a sample of 64 points per
# list the centroids barely move after 10, and training 8192 lists at 25 costs minutes on one core.
KMEANS_ITERATIONS = 10


@contextlib.contextmanager
def _c_stdout_to_stderr():
    """faiss's on-disk lists report resizes and file moves with C printf; keep stdout for results (--json)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def train(spec: dict[str, Any], position: int, store: EmbeddingStore, memory_budget: int) -> np.ndarray:
    """The empty trained index (serialised) for the store's vectors, trained on a seeded sample."""
    import retrievers

    probe = retrievers.build(spec, position)
    nlist = probe._nlist(store.count)
    if nlist > store.count:
        raise ConfigError(f"retrieval.retrievers[{position}].nlist",
                          f"{nlist} lists need at least as many chunks, got {store.count}")
    index = probe._empty_ivf(store.dim, nlist)
    faiss.extract_index_ivf(index).cp.niter = KMEANS_ITERATIONS
    size = min(probe.params.train_size or 64 * nlist, store.count, rows_per_part(memory_budget, store.dim))
    sample = np.sort(np.random.default_rng(0).choice(store.count, size, replace=False))
    index.train(store.take(sample))
    return faiss.serialize_index(index)


def build_ivf_shards(spec: dict[str, Any], position: int, ids: Sequence[str], folder: Path, plan: BuildPlan,
                     store: EmbeddingStore) -> list[int]:
    """Train once, then build each shard's on-disk lists (in parallel where the runner allows)."""
    trained = plan.timed("train", train, spec, position, store, plan.memory_budget)
    jobs = [(i, start, end, str(folder)) for i, (start, end) in enumerate(split(len(ids), plan.shards))]
    batch_rows = rows_per_part(plan.memory_budget, store.dim)
    return plan.timed("add", plan.runner.map, _ivf_shard, jobs, plan.runner.share(ids), str(store.directory),
                      trained, batch_rows, desc=f"adding {spec['type']}", rows=[end - start for _, start, end, _ in jobs])


def _ivf_shard(job: tuple[int, int, int, str], ids: Sequence[str], store_dir: str, trained: np.ndarray,
               batch_rows: int) -> int:
    from faiss.contrib.ondisk import merge_ondisk

    number, start, end, folder = job
    out = shard_dir(Path(folder), number)
    out.mkdir()
    store = EmbeddingStore.open(store_dir)
    blocks = []
    for block, (lo, hi) in enumerate((lo, min(lo + batch_rows, end)) for lo in range(start, end, batch_rows)):
        index = faiss.deserialize_index(trained)
        index.add_with_ids(store.rows(lo, hi), np.arange(lo - start, hi - start, dtype=np.int64))
        blocks.append(out / f".block-{block:05d}.faiss")
        faiss.write_index(index, str(blocks[-1]))
        del index
    merged = faiss.deserialize_index(trained)
    with _c_stdout_to_stderr():
        merge_ondisk(merged, [str(b) for b in blocks], str(out / "lists.ivfdata"))
        faiss.write_index(merged, str(out / "index.faiss"))
    for block in blocks:
        block.unlink()
    _save_ids(out / "ids.npy", ids, start, end, batch_rows)
    pieces = store.parts_of(start, end)
    names = []
    for n, _, _ in pieces:
        names.append(f"vectors-{len(names):05d}.npy")
        link_or_copy(store.part_file(n), out / names[-1])
    atomic_write_json(out / MANIFEST, {"count": end - start, "dim": store.dim, "vectors": names,
                                       "skip": pieces[0][1] if pieces else 0})
    return end - start


def _save_ids(path: Path, ids: Sequence[str], start: int, end: int, batch_rows: int) -> None:
    """ids[start:end] as fixed-width UTF-8, written batch by batch (10M ids as Python strings would be ~1 GB)."""
    width = max((len(cid.encode("utf-8")) for lo in range(start, end, batch_rows)
                 for cid in ids[lo:min(lo + batch_rows, end)]), default=1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=f"S{width}", shape=(end - start,))
    for lo in range(start, end, batch_rows):
        hi = min(lo + batch_rows, end)
        out[lo - start:hi - start] = [cid.encode("utf-8") for cid in ids[lo:hi]]
    out.flush()
    del out


class OnDiskIVF:
    """One on-disk IVF shard: search_vectors(queries, k) -> hits with exact inner-product scores."""

    def __init__(self, folder: Path, params: Any, manifest: dict[str, Any]):
        self.params, self.count, self.skip = params, manifest["count"], manifest["skip"]
        with _c_stdout_to_stderr():
            self.index = faiss.read_index(str(folder / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
        faiss.extract_index_ivf(self.index).nprobe = params.nprobe
        self.ids = np.load(folder / "ids.npy", mmap_mode="r")
        self.vectors = [np.load(folder / name, mmap_mode="r") for name in manifest["vectors"]]
        self.lengths = [len(v) for v in self.vectors]

    @classmethod
    def load(cls, folder: Path, spec: dict[str, Any], position: int) -> "OnDiskIVF":
        import retrievers

        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            return cls(folder, retrievers.build(spec, position).params, manifest)
        except (OSError, RuntimeError, KeyError, json.JSONDecodeError) as exc:
            raise IndexMismatchError(f"{folder}: unreadable on-disk IVF shard ({exc}); re-run `ragkit index`") from None

    def __len__(self) -> int:
        return self.count

    def search_vectors(self, queries: np.ndarray, k: int, filter: Mapping[str, Any] | None = None
                       ) -> list[list[Hit]]:
        if filter:
            raise ValueError("metadata filters are not supported on an on-disk IVF index; use type = \"dense\"")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        fetch = min(self.count, k * getattr(self.params, "rerank", 1) + TIE_MARGIN)
        if not self.count:
            return [[] for _ in queries]
        _, found = self.index.search(queries, fetch)
        out = []
        for query, rows in zip(queries, found):
            rows = np.sort(rows[rows >= 0])
            exact = take_rows(self.vectors.__getitem__, self.lengths, rows + self.skip) @ query
            ids = self.ids[rows]
            order = np.lexsort((ids, -exact))[:k]
            out.append([Hit(ids[i].decode("utf-8"), float(exact[i]), rank) for rank, i in enumerate(order, 1)])
        return out

