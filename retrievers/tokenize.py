"""BM25 tokenisation, token-for-token the same as `bm25s.tokenize`.

Lower-case, split on `\\b\\w\\w+\\b` (scikit-learn's pattern), drop stop words, stem with
PyStemmer. Terms get integer ids in first-seen order; the vocabulary only grows, so chunks
added later keep the ids of earlier ones.
"""

from __future__ import annotations

import re

import Stemmer
from bm25s.stopwords import STOPWORDS_EN

STEMMERS = ["none", *sorted(Stemmer.algorithms())]
STOPWORD_LISTS = {"en": frozenset(STOPWORDS_EN), "none": frozenset()}


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
