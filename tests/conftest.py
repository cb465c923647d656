"""Shared fixtures: a word-level tokenizer with offsets (fast, no model) and the real one."""

from __future__ import annotations

import re

import pytest


class WordTokenizer:
    """Splits on whitespace-prefixed words, like a byte-level BPE keeps leading spaces."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=True):
        ids, offsets = [], []
        for text in texts:
            spans = [(m.start(), m.end()) for m in re.finditer(r"\s*\S+", text)]
            ids.append([self.vocab.setdefault(text[a:b].strip(), len(self.vocab)) for a, b in spans])
            offsets.append(spans)
        return {"input_ids": ids, "offset_mapping": offsets}


@pytest.fixture
def word_tokenizer():
    return WordTokenizer()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from generators.weights import load_tokenizer

    return load_tokenizer("smollm2")
