"""Sparse BM25 retriever (Lucene variant, k1 = 0.9, b = 0.4 as Pyserini and BRIGHT use).

Two backends over the same tokenisation and the same saved files:
- `bm25s` (default): the eager score matrix of `retrievers.sparse` (bm25s's layout and
  weights), memory-mapped on load; a query touches only its terms' postings.
- `rank_bm25`: the `rank-bm25` package with its IDF replaced by the same variant, the
  slow reference that the fast backend is tested against.

`query_side = true` applies BRIGHT's official weighting (gensim LuceneBM25Model): the query's
bag of words gets the same BM25 weight as a document, with its own length, and the score
is the dot product of the two weight vectors. The default is Lucene's bag of words, where
each query-term occurrence adds the document's weight once.

A retriever made with `corpus` (a `CorpusStats` of a larger corpus, from `gather_stats` over
its parts) is one shard of that corpus: it shares the corpus's vocabulary and scores with its
idf and average length, so a shard's hits carry the scores one index over everything gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np

from retrievers.base import Retriever
from retrievers.sparse import IDF_VARIANTS, CorpusStats, ScoreMatrix
from retrievers.tokenize import STEMMERS, STOPWORD_LISTS, Tokenizer
from retrievers.topk import top_k

BACKENDS = ["bm25s", "rank_bm25"]
TOKENIZE_BATCH = 100_000  # texts per step of gather_stats: bounds its memory, not its result


@dataclass
class BM25Params:
    backend: str = "bm25s"
    k1: float = 0.9
    b: float = 0.4
    idf: str = "lucene"
    stemmer: str = "english"
    stopwords: str = "en"
    query_side: bool = False
    mmap: bool = True

    choices: ClassVar[dict[str, list[str]]] = {
        "backend": BACKENDS, "idf": IDF_VARIANTS, "stemmer": STEMMERS, "stopwords": sorted(STOPWORD_LISTS),
    }
    positive: ClassVar[tuple[str, ...]] = ("k1",)
    unit_interval: ClassVar[tuple[str, ...]] = ("b",)


class BM25Retriever(Retriever):
    type = "bm25"
    index_params = ("k1", "b", "idf", "stemmer", "stopwords")

    def __init__(self, params: BM25Params, corpus: CorpusStats | None = None):
        self.corpus = corpus
        super().__init__(params)

    def _reset(self) -> None:
        super()._reset()
        p = self.params
        self.tokenizer = Tokenizer(p.stemmer, p.stopwords, self.corpus.vocab if self.corpus else None)
        self.matrix = ScoreMatrix(p.k1, p.b, p.idf, self.corpus)
        self._reference = None

    def gather_stats(self, texts: Iterable[str]) -> CorpusStats:
        """Pass 1 of a sharded build: the statistics of these texts, to merge with other parts'."""
        tokenizer = Tokenizer(self.params.stemmer, self.params.stopwords)
        doc_freq = np.zeros(0, dtype=np.int64)
        n_docs = total_len = 0
        texts = iter(texts)
        while batch := list(islice(texts, TOKENIZE_BATCH)):
            terms, lengths = tokenizer.encode_many(batch, grow=True)
            n_docs, total_len, n_terms = n_docs + len(batch), total_len + int(lengths.sum()), len(tokenizer.vocab)
            doc_and_term = np.sort(np.repeat(np.arange(len(batch)), lengths) * n_terms + terms)
            first = np.flatnonzero(np.diff(doc_and_term, prepend=-1))  # each (text, term) pair once
            doc_freq = _add_counts(doc_freq, doc_and_term[first] % n_terms, n_terms)
        return CorpusStats(tokenizer.vocab, doc_freq, n_docs, total_len)

    def _add_texts(self, texts: list[str]) -> None:
        known = len(self.tokenizer.vocab)
        terms, lengths = self.tokenizer.encode_many(texts, grow=True)
        if self.corpus is not None and len(self.tokenizer.vocab) != known:
            raise ValueError("a text holds terms outside the corpus statistics: gather them over every shard")
        self.matrix.append(terms, lengths, len(self.tokenizer.vocab))
        self._reference = None

    def _deleted(self, slots: np.ndarray) -> None:
        if self.corpus is not None:
            raise ValueError("a shard scored with whole-corpus statistics cannot delete; rebuild the sharded index")
        # BM25 statistics (N, df, avgdl) must forget deleted chunks at once to match a fresh build.
        self.matrix.keep(self._compact())
        self._reference = None

    def query_terms(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """Unique in-corpus term ids of a query and their weights (occurrence counts or BM25)."""
        counts_of: dict[int, int] = {}
        for term in self.tokenizer.encode(query, grow=False):
            counts_of[term] = counts_of.get(term, 0) + 1
        terms = np.fromiter(counts_of, dtype=np.int64, count=len(counts_of))
        counts = np.fromiter(counts_of.values(), dtype=np.int64, count=len(counts_of))
        present = self.matrix.doc_freq[terms] > 0  # terms whose chunks were all deleted do not count
        terms, counts = terms[present], counts[present]
        if not self.params.query_side:
            return terms, counts.astype(np.float64)
        p, m = self.params, self.matrix
        norm = p.k1 * (1 - p.b + p.b * counts.sum() / m.avgdl)
        return terms, m.idf[terms].astype(np.float64) * counts / (counts + norm)

    def _search(self, queries: list[str], k: int, allowed: np.ndarray | None) -> tuple[list, list]:
        scorer = self._reference_scores if self.params.backend == "rank_bm25" else self.matrix.scores
        slot_lists, score_lists = [], []
        for query in queries:
            terms, weights = self.query_terms(query)
            scores = scorer(terms, weights)
            matched = scores > 0 if allowed is None else (scores > 0) & allowed
            slots = top_k(scores, k, self.id_rank, np.flatnonzero(matched))
            slot_lists.append(slots)
            score_lists.append(scores[slots])
        return slot_lists, score_lists

    def _reference_scores(self, terms: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Scores from rank-bm25, rescaled by 1 / (k1 + 1) to Lucene's scale."""
        if self._reference is None:
            self._reference = _reference_model(self.matrix, self.params)
        scores = np.zeros(self.matrix.n_docs, dtype=np.float64)
        for term, weight in zip(terms.tolist(), weights.tolist()):
            scores += weight * self._reference.get_scores([term])
        return (scores / (self.params.k1 + 1)).astype(np.float32)

    def _save_arrays(self, directory: Path) -> None:
        self.matrix.save(directory, self.tokenizer.vocab)

    def _load_arrays(self, directory: Path, manifest: dict[str, Any]) -> None:
        vocab = json.loads((directory / "vocab.index.json").read_text(encoding="utf-8"))
        self.tokenizer = Tokenizer(self.params.stemmer, self.params.stopwords, vocab)
        self.corpus = self.matrix.stats = CorpusStats.load(directory, vocab)
        self.matrix.load(directory, mmap=self.params.mmap)


def _add_counts(counts: np.ndarray, term_ids: np.ndarray, n_terms: int) -> np.ndarray:
    grown = np.bincount(term_ids, minlength=n_terms)
    grown[:len(counts)] += counts
    return grown


def _reference_model(matrix: ScoreMatrix, params: BM25Params):
    """A rank_bm25.BM25Okapi over the same documents, with the configured IDF variant."""
    from rank_bm25 import BM25Okapi

    from retrievers.sparse import idf

    class ReferenceBM25(BM25Okapi):
        def _calc_idf(self, nd):
            terms = list(nd)
            values = idf(np.array([nd[t] for t in terms]), self.corpus_size, params.idf)
            self.idf = dict(zip(terms, values.astype(np.float64)))

    term_of_posting = np.repeat(np.arange(matrix.n_terms), np.diff(matrix.indptr))
    order = np.argsort(matrix.indices, kind="stable")
    rows, terms, counts = matrix.indices[order], term_of_posting[order], matrix.tf[order]
    bounds = np.searchsorted(rows, np.arange(matrix.n_docs + 1))
    corpus = [np.repeat(terms[s:e], counts[s:e]).tolist() for s, e in zip(bounds[:-1], bounds[1:])]
    return ReferenceBM25(corpus, k1=params.k1, b=params.b)
