"""Dense retrievers over FAISS: exact inner product (`dense`), HNSW, IVF-Flat and IVF-PQ.

Vectors are kept beside the FAISS index (memory-mapped after load): they let a filtered or
post-deletion search fall back to exact scoring over the allowed slots, so it still returns
k hits whenever k matching chunks exist, and they rebuild an ANN index without re-embedding.
Deleted chunks are tombstoned and skipped; once a quarter of the slots are dead the index is
rebuilt from the live vectors. When faiss has GPU support and CUDA is present, the flat and
IVF indexes move to the GPU (faiss has no GPU HNSW); the search logic around them is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import faiss
import numpy as np

from ragkit.errors import ConfigError
from ragkit.types import Hit
from retrievers.base import Retriever
from retrievers.embedding_cache import EmbeddingCache
from retrievers.encoder import AUTO, DEFAULT_MODEL, Encoder, resolve_model
from retrievers.topk import top_k

TIE_MARGIN = 8  # extra results fetched so that exact score ties at the k-th place resolve by id
EXACT_FRACTION = 0.05  # filters allowing fewer slots than this are scored exactly over those slots
REBUILD_DEAD_FRACTION = 0.25


@dataclass
class DenseParams:
    model: str = DEFAULT_MODEL
    batch_size: int = 64
    max_length: int = 256
    normalize: bool = True
    query_prefix: str = AUTO
    document_prefix: str = AUTO
    cache_dir: str = ".ragkit/embeddings"
    device: str = AUTO

    choices: ClassVar[dict[str, list[str]]] = {"device": [AUTO, "cpu", "cuda"]}
    positive: ClassVar[tuple[str, ...]] = ("batch_size",)
    unit_interval: ClassVar[tuple[str, ...]] = ()


@dataclass
class HNSWParams(DenseParams):
    M: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    positive: ClassVar[tuple[str, ...]] = ("batch_size", "M", "ef_construction", "ef_search")


@dataclass
class IVFParams(DenseParams):
    nlist: int = 0  # 0: about 4 * sqrt(n), at least 39 training points per list
    nprobe: int = 16
    train_size: int = 0  # 0: up to 64 points per list, sampled with a fixed seed

    positive: ClassVar[tuple[str, ...]] = ("batch_size", "nprobe")


@dataclass
class IVFPQParams(IVFParams):
    m: int = 48  # sub-quantizers; must divide the embedding dimension
    nbits: int = 8
    # Fetch rerank * k candidates by PQ distance, then re-score them exactly (1: no re-ranking).
    rerank: int = 4

    positive: ClassVar[tuple[str, ...]] = ("batch_size", "nprobe", "m", "nbits", "rerank")


_gpu_resources = None


def _on_device(index: faiss.Index) -> faiss.Index:
    """The same index on GPU 0 when faiss was built with GPU support and one is present."""
    global _gpu_resources
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)


def _on_host(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and faiss.get_num_gpus() else index


class DenseRetriever(Retriever):
    """Exact inner-product search (cosine with normalised embeddings) with faiss IndexFlatIP."""

    type = "dense"
    index_params = ("model", "max_length", "normalize", "document_prefix")
    ann_file: ClassVar[str | None] = None  # flat indexes are rebuilt from vectors.npy on load

    def __init__(self, params: DenseParams, key: str = "retrieval.retrievers[0]"):
        self.key = key
        model_dir = resolve_model(params.model, f"{key}.model")
        self.encoder = Encoder(model_dir, params.batch_size, params.max_length, params.normalize,
                               params.query_prefix, params.document_prefix, params.device)
        super().__init__(params)

    def _reset(self) -> None:
        super()._reset()
        self.vectors = np.zeros((0, 0), dtype=np.float32)
        self.faiss_index: faiss.Index | None = None
        self.last_encoded = 0

    # -- adding and deleting ----------------------------------------------------------------

    def _add_texts(self, texts: list[str]) -> None:
        cache = EmbeddingCache(self.params.cache_dir, self.encoder.fingerprint())
        vectors, self.last_encoded = cache.embed(texts, lambda todo: self.encoder.encode(todo, "document",
                                                                                       progress=len(todo) > 1000))
        self._append(vectors)

    def add_vectors(self, ids: Sequence[str], vectors: np.ndarray,
                    metadata: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Add precomputed document embeddings (n, dim) under chunk ids."""
        if len(ids) != len(vectors) or len(set(ids)) != len(ids):
            raise ValueError("add_vectors needs one vector per distinct id")
        self.delete([cid for cid in ids if cid in self.slot_of])
        self._append(np.ascontiguousarray(vectors, dtype=np.float32))
        self._register(list(ids), list(metadata) if metadata is not None else [{}] * len(ids))

    def _append(self, vectors: np.ndarray) -> None:
        if len(vectors) == 0:
            return
        self.vectors = vectors if len(self.vectors) == 0 else np.concatenate([self.vectors, vectors])
        if self.faiss_index is None:
            self.faiss_index = _on_device(self._new_index(self.vectors))
        self.faiss_index.add(vectors)

    def _deleted(self, slots: np.ndarray) -> None:
        if (~self.live).sum() > REBUILD_DEAD_FRACTION * len(self.live):
            self._rebuild()

    def _rebuild(self) -> None:
        """Drop tombstoned slots and index the live vectors again (no re-embedding)."""
        keep = self._compact()
        self.vectors = np.ascontiguousarray(self.vectors[keep])
        self.faiss_index = _on_device(self._new_index(self.vectors)) if len(self.vectors) else None
        if self.faiss_index is not None:
            self.faiss_index.add(self.vectors)

    def _new_index(self, vectors: np.ndarray) -> faiss.Index:
        """An empty (trained, where needed) index for vectors like these."""
        return faiss.IndexFlatIP(vectors.shape[1])

    # -- searching --------------------------------------------------------------------------

    def _configure_search(self) -> None:
        """Set query-time knobs (efSearch, nprobe) that are not stored in the index."""

    def _search(self, queries: list[str], k: int, allowed: np.ndarray | None) -> tuple[list, list]:
        return self._search_vectors(self.encoder.encode(queries, "query"), k, allowed)

    def search_vectors(self, query_vectors: np.ndarray, k: int, filter: Mapping[str, Any] | None = None
                       ) -> list[list[Hit]]:
        """search() for precomputed query embeddings (nq, dim)."""
        if not self.slot_of:
            return [[] for _ in range(len(query_vectors))]
        slot_lists, score_lists = self._search_vectors(np.ascontiguousarray(query_vectors, dtype=np.float32), k,
                                                       self._allowed(filter))
        return [self._hits(slots, scores) for slots, scores in zip(slot_lists, score_lists)]

    def _search_vectors(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[list, list]:
        n_slots = len(self.ids)
        n_allowed = n_slots if allowed is None else int(allowed.sum())
        if n_allowed == 0:
            return [np.zeros(0, dtype=np.int64)] * len(queries), [np.zeros(0, dtype=np.float32)] * len(queries)
        if n_allowed < EXACT_FRACTION * n_slots:
            return self._exact(queries, k, np.flatnonzero(allowed))
        self._configure_search()
        fetch = min(n_slots, math.ceil((k + TIE_MARGIN) * n_slots / n_allowed))
        scores, slots = self.faiss_index.search(queries, fetch)
        slot_lists, score_lists, redo = [], [], []
        for q in range(len(queries)):
            found, values = slots[q], scores[q]
            keep = found >= 0
            if allowed is not None:
                keep &= allowed[np.maximum(found, 0)]
            found, values = found[keep], values[keep]
            # Too few allowed hits, or a score tie crossing the cut: settle this query exactly.
            if len(found) < min(k, n_allowed) or (len(found) > k and values[k - 1] == values[-1] and fetch < n_slots):
                redo.append(q)
            order = np.lexsort((self.id_rank[found], -values))[:k]
            slot_lists.append(found[order])
            score_lists.append(values[order])
        if redo:
            candidates = np.arange(n_slots) if allowed is None else np.flatnonzero(allowed)
            exact_slots, exact_scores = self._exact(queries[redo], k, candidates)
            for q, s, v in zip(redo, exact_slots, exact_scores):
                slot_lists[q], score_lists[q] = s, v
        return slot_lists, score_lists

    def _exact(self, queries: np.ndarray, k: int, candidates: np.ndarray) -> tuple[list, list]:
        """Exact inner-product top-k over the given slots."""
        block = np.asarray(self.vectors[candidates], dtype=np.float32) @ queries.T  # (n_candidates, nq)
        full = np.full(len(self.ids), -np.inf, dtype=np.float32)
        slot_lists, score_lists = [], []
        for q in range(len(queries)):
            full[candidates] = block[:, q]
            slots = top_k(full, k, self.id_rank, candidates)
            slot_lists.append(slots)
            score_lists.append(full[slots])
        return slot_lists, score_lists

    # -- persistence ------------------------------------------------------------------------

    def _save_arrays(self, directory: Path) -> None:
        np.save(directory / "vectors.npy", self.vectors)
        if self.ann_file and self.faiss_index is not None:
            faiss.write_index(_on_host(self.faiss_index), str(directory / self.ann_file))

    def _load_arrays(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.vectors = np.load(directory / "vectors.npy", mmap_mode="r")
        if len(self.vectors) != len(self.ids):
            raise_mismatch(directory, "vectors.npy does not match ids.json")
        if not len(self.vectors):
            return
        if self.ann_file:
            self.faiss_index = _on_device(faiss.read_index(str(directory / self.ann_file)))
        else:
            self.faiss_index = _on_device(self._new_index(self.vectors))
            self.faiss_index.add(np.ascontiguousarray(self.vectors))


def raise_mismatch(directory: Path, problem: str) -> None:
    from ragkit.errors import IndexMismatchError

    raise IndexMismatchError(f"{directory}: {problem}; re-run `ragkit index`")


class HNSWRetriever(DenseRetriever):
    type = "hnsw"
    index_params = DenseRetriever.index_params + ("M", "ef_construction")
    ann_file = "index.faiss"

    def _new_index(self, vectors: np.ndarray) -> faiss.Index:
        index = faiss.IndexHNSWFlat(vectors.shape[1], self.params.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.params.ef_construction
        return index

    def _configure_search(self) -> None:
        faiss.downcast_index(self.faiss_index).hnsw.efSearch = self.params.ef_search


class IVFRetriever(DenseRetriever):
    """IVF-Flat: k-means lists trained on a sample; nprobe lists are scanned per query."""

    type = "ivf"
    index_params = DenseRetriever.index_params + ("nlist", "train_size")
    ann_file = "index.faiss"

    def _nlist(self, n: int) -> int:
        if self.params.nlist:
            return self.params.nlist
        return max(1, min(int(4 * math.sqrt(n)), n // 39))

    def _empty_ivf(self, dim: int, nlist: int) -> faiss.Index:
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)

    def _new_index(self, vectors: np.ndarray) -> faiss.Index:
        nlist = self._nlist(len(vectors))
        if nlist > len(vectors):
            raise ConfigError(f"{self.key}.nlist", f"{nlist} lists need at least as many chunks, got {len(vectors)}")
        index = self._empty_ivf(vectors.shape[1], nlist)
        size = self.params.train_size or 64 * nlist
        sample = np.random.default_rng(0).permutation(len(vectors))[:size]
        index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
        return index

    def _configure_search(self) -> None:
        faiss.extract_index_ivf(self.faiss_index).nprobe = self.params.nprobe


class IVFPQRetriever(IVFRetriever):
    """IVF with product-quantised residuals: m sub-vectors of nbits each per chunk."""

    type = "ivfpq"
    index_params = IVFRetriever.index_params + ("m", "nbits")

    def _empty_ivf(self, dim: int, nlist: int) -> faiss.Index:
        if dim % self.params.m:
            raise ConfigError(f"{self.key}.m", f"must divide the embedding dimension {dim}, got {self.params.m}")
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, self.params.m, self.params.nbits,
                                faiss.METRIC_INNER_PRODUCT)

    def _search_vectors(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[list, list]:
        """PQ scores are approximate: re-score a wider candidate set with the stored vectors."""
        if self.params.rerank == 1:
            return super()._search_vectors(queries, k, allowed)
        candidate_lists, _ = super()._search_vectors(queries, k * self.params.rerank, allowed)
        slot_lists, score_lists = [], []
        for query, candidates in zip(queries, candidate_lists):
            exact = np.asarray(self.vectors[candidates], dtype=np.float32) @ query
            order = np.lexsort((self.id_rank[candidates], -exact))[:k]
            slot_lists.append(candidates[order])
            score_lists.append(exact[order])
        return slot_lists, score_lists
