"""The BM25 score matrix: term frequencies and precomputed Lucene weights, term-major (CSC).

The layout and the weights are those of `bm25s` (eager scoring: w(t, d) = idf(t) *
tf / (tf + k1 * (1 - b + b * |d| / avgdl)), stored per posting), and the files use bm25s's
names, so `bm25s.BM25.load` opens a saved ragkit index. Unlike bm25s, the term frequencies
are kept too: adding or deleting documents edits the postings and recomputes the weights in
one vectorised pass, with no re-tokenisation, and gives exactly what a fresh build gives.

A shard of a larger corpus is scored with that corpus's `CorpusStats` (document frequencies,
document count, total length) instead of its own, so its scores equal those of one matrix
over the whole corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

IDF_VARIANTS = ["lucene", "robertson"]


def idf(df: np.ndarray, n_docs: int, variant: str) -> np.ndarray:
    """Inverse document frequency per term (float32, as bm25s stores it)."""
    df = df.astype(np.float64)
    ratio = (n_docs - df + 0.5) / (df + 0.5)
    if variant == "lucene":
        return np.log1p(ratio).astype(np.float32)
    return np.log(np.maximum(ratio, 1.0)).astype(np.float32)  # robertson, floored at 0 like bm25s


@dataclass
class CorpusStats:
    """Whole-corpus BM25 statistics over one shared vocabulary (term -> id in first-seen order)."""

    vocab: dict[str, int]
    doc_freq: np.ndarray  # (len(vocab),) int64: documents holding each term
    n_docs: int
    total_len: int  # sum of document lengths in terms

    @property
    def avgdl(self) -> float:
        return float(self.total_len) / max(self.n_docs, 1)

    @classmethod
    def merge(cls, parts: list["CorpusStats"]) -> "CorpusStats":
        """Statistics of the parts' corpora one after another; term ids stay in first-seen order."""
        vocab: dict[str, int] = {}
        for part in parts:
            for term in part.vocab:
                vocab.setdefault(term, len(vocab))
        doc_freq = np.zeros(len(vocab), dtype=np.int64)
        for part in parts:
            ids = np.fromiter((vocab[t] for t in part.vocab), dtype=np.int64, count=len(part.vocab))
            doc_freq[ids] += part.doc_freq[np.fromiter(part.vocab.values(), dtype=np.int64, count=len(ids))]
        return cls(vocab, doc_freq, sum(p.n_docs for p in parts), sum(p.total_len for p in parts))

    def save(self, directory: Path) -> None:
        np.save(directory / "corpus_doc_freq.index.npy", self.doc_freq)
        (directory / "corpus_stats.index.json").write_text(json.dumps(
            {"n_docs": self.n_docs, "total_len": self.total_len}), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path, vocab: dict[str, int]) -> "CorpusStats | None":
        """The statistics saved beside a shard, or None for an index that is its own corpus."""
        path = directory / "corpus_stats.index.json"
        if not path.is_file():
            return None
        counts = json.loads(path.read_text(encoding="utf-8"))
        return cls(vocab, np.load(directory / "corpus_doc_freq.index.npy"), counts["n_docs"], counts["total_len"])


class ScoreMatrix:
    """(n_docs x n_terms) postings, term-major: `indptr`, `indices` (doc rows), `tf`, and BM25 `data`.

    With `stats`, idf and average length come from the whole corpus (this matrix is a shard of it).
    """

    def __init__(self, k1: float, b: float, idf_variant: str, stats: CorpusStats | None = None):
        self.k1, self.b, self.idf_variant = k1, b, idf_variant
        self.stats = stats
        self.indptr = np.zeros(1, dtype=np.int64)
        self.indices = np.zeros(0, dtype=np.int32)
        self.tf = np.zeros(0, dtype=np.int32)
        self.doc_len = np.zeros(0, dtype=np.int64)
        self.data = np.zeros(0, dtype=np.float32)
        self.idf = np.zeros(0, dtype=np.float32)
        self.doc_freq = np.zeros(0, dtype=np.int64)

    @property
    def n_docs(self) -> int:
        return len(self.doc_len)

    @property
    def n_terms(self) -> int:
        return len(self.indptr) - 1

    @property
    def avgdl(self) -> float:
        if self.stats is not None:
            return self.stats.avgdl
        return float(self.doc_len.sum()) / max(self.n_docs, 1)

    def _matrix(self, n_rows: int, n_terms: int) -> sp.csc_matrix:
        indptr = np.concatenate([self.indptr, np.full(n_terms - self.n_terms, self.indptr[-1])])
        return sp.csc_matrix((self.tf, self.indices, indptr), shape=(n_rows, n_terms))

    def _set(self, matrix: sp.csc_matrix, doc_len: np.ndarray) -> None:
        matrix.sum_duplicates()  # also sorts each term's postings by document row
        self.indptr = matrix.indptr.astype(np.int64)
        self.indices = matrix.indices.astype(np.int32)
        self.tf = matrix.data.astype(np.int32)
        self.doc_len = doc_len
        self.refresh()

    def append(self, terms: np.ndarray, lengths: np.ndarray, n_terms: int) -> None:
        """Add documents as new rows: their term ids concatenated, and each one's count of them.

        The vocabulary may have grown to `n_terms`."""
        n_rows = self.n_docs + len(lengths)
        rows = np.repeat(np.arange(self.n_docs, n_rows), lengths)
        new = sp.csc_matrix((np.ones(len(terms), dtype=np.int32), (rows, terms)), shape=(n_rows, n_terms))
        self._set((self._matrix(n_rows, n_terms) + new).tocsc(), np.concatenate([self.doc_len, lengths]))

    def keep(self, keep: np.ndarray) -> None:
        """Keep only the rows where `keep` is True (documents deleted)."""
        matrix = self._matrix(self.n_docs, self.n_terms)[np.flatnonzero(keep)].tocsc()
        self._set(matrix, self.doc_len[keep])

    def refresh(self) -> None:
        """Recompute idf and every posting's weight from tf, |d|, N and avgdl."""
        self._set_idf()
        term_of_posting = np.repeat(np.arange(self.n_terms), np.diff(self.indptr))
        freq = self.tf.astype(np.float32)
        norm = self.k1 * ((1 - self.b) + self.b * self.doc_len[self.indices] / np.float64(self.avgdl))
        self.data = (self.idf[term_of_posting] * (freq / (norm + freq))).astype(np.float32)

    def scores(self, terms: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Sum over query terms of weight * w(t, d), for every document: (n_docs,) float32."""
        out = np.zeros(self.n_docs, dtype=np.float32)
        indptr, indices, data = self.indptr, self.indices, self.data
        for term, weight in zip(terms.tolist(), weights.tolist()):
            start, end = indptr[term], indptr[term + 1]
            np.add.at(out, indices[start:end], data[start:end] if weight == 1.0 else np.float32(weight) * data[start:end])
        return out

    def save(self, directory: Path, vocab: dict[str, int]) -> None:
        np.save(directory / "data.csc.index.npy", self.data)
        np.save(directory / "indices.csc.index.npy", self.indices)
        np.save(directory / "indptr.csc.index.npy", self.indptr)
        np.save(directory / "tf.csc.index.npy", self.tf)
        np.save(directory / "doc_len.index.npy", self.doc_len)
        (directory / "vocab.index.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (directory / "params.index.json").write_text(json.dumps({
            "k1": self.k1, "b": self.b, "delta": 0.5, "method": "lucene", "idf_method": self.idf_variant,
            "dtype": "float32", "int_dtype": "int32", "num_docs": self.n_docs, "backend": "numpy",
        }), encoding="utf-8")
        if self.stats is not None:
            self.stats.save(directory)

    def load(self, directory: Path, mmap: bool) -> None:
        """Read the arrays; with mmap the postings stay on disk until a search touches them."""
        mode = "r" if mmap else None
        self.indptr = np.load(directory / "indptr.csc.index.npy", mmap_mode=mode)
        self.indices = np.load(directory / "indices.csc.index.npy", mmap_mode=mode)
        self.tf = np.load(directory / "tf.csc.index.npy", mmap_mode=mode)
        self.data = np.load(directory / "data.csc.index.npy", mmap_mode=mode)
        self.doc_len = np.load(directory / "doc_len.index.npy")
        self._set_idf()

    def _set_idf(self) -> None:
        if self.stats is None:
            self.doc_freq, n_docs = np.diff(self.indptr), self.n_docs
        else:
            self.doc_freq, n_docs = self.stats.doc_freq, self.stats.n_docs
        self.idf = idf(self.doc_freq, n_docs, self.idf_variant)
