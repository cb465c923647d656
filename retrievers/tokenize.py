"""BM25 tokenisation, token-for-token the same as `bm25s.tokenize`.

Lower-case, split on `\\b\\w\\w+\\b` (scikit-learn's pattern), drop stop words, stem with
PyStemmer. Terms get integer ids in first-seen order; the vocabulary only grows, so chunks
added later keep the ids of earlier ones. `encode_many` gives the same ids for many texts at
once with the per-token work in C-level loops (a 2M-chunk build tokenises ~100M words).
"""

from __future__ import annotations

import re
from itertools import chain
from typing import Sequence

import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN

STEMMERS = ["none", *sorted(Stemmer.algorithms())]
STOPWORD_LISTS = {"en": frozenset(STOPWORDS_EN), "none": frozenset()}
BATCH = 20_000  # texts whose words are held at once by encode_many (about 100 MB of Python strings)


class Tokenizer:
    def __init__(self, stemmer: str = "english", stopwords: str = "en", vocab: dict[str, int] | None = None):
        self._split = re.compile(r"(?u)\b\w\w+\b").findall
        self._stop = STOPWORD_LISTS[stopwords]
        self._stem = None if stemmer == "none" else Stemmer.Stemmer(stemmer).stemWord
        self.vocab: dict[str, int] = dict(vocab or {})
        self._term_of_word: dict[str, str | None] = {}  # None marks a stop word

    def _term(self, word: str) -> str | None:
        if word in self._stop:
            term = None
        else:
            term = self._stem(word) if self._stem else word
        self._term_of_word[word] = term
        return term

    def terms(self, text: str) -> list[str]:
        cache = self._term_of_word
        out = []
        for word in self._split(text.lower()):
            term = cache[word] if word in cache else self._term(word)
            if term is not None:
                out.append(term)
        return out

    def encode(self, text: str, grow: bool) -> list[int]:
        """Term ids of `text`; with grow=False, terms outside the vocabulary are dropped."""
        vocab = self.vocab
        if grow:
            return [vocab.setdefault(term, len(vocab)) for term in self.terms(text)]
        return [vocab[term] for term in self.terms(text) if term in vocab]

    def encode_many(self, texts: Sequence[str], grow: bool) -> tuple[np.ndarray, np.ndarray]:
        """(term ids of every text, concatenated; each text's count of them), as `encode` per text gives."""
        pieces = [self._encode_batch(texts[i:i + BATCH], grow) for i in range(0, len(texts), BATCH)]
        if not pieces:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate([terms for terms, _ in pieces]), np.concatenate([counts for _, counts in pieces])

    def _encode_batch(self, texts: Sequence[str], grow: bool) -> tuple[np.ndarray, np.ndarray]:
        words_per_text = [self._split(text.lower()) for text in texts]
        words = list(chain.from_iterable(words_per_text))
        cache, vocab = self._term_of_word, self.vocab
        id_of_word: dict[str, int] = {}
        for word in dict.fromkeys(words):  # unique words in first-seen order, so new ids come in that order too
            term = cache[word] if word in cache else self._term(word)
            if term is None or not (grow or term in vocab):
                id_of_word[word] = -1
            else:
                id_of_word[word] = vocab.setdefault(term, len(vocab))
        ids = np.fromiter(map(id_of_word.__getitem__, words), dtype=np.int64, count=len(words))
        text_of_word = np.repeat(np.arange(len(texts)), [len(w) for w in words_per_text])
        kept = ids >= 0
        return ids[kept], np.bincount(text_of_word[kept], minlength=len(texts))
