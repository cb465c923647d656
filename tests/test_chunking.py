from hypothesis import given, settings, strategies as st

from ragkit.chunking import chunk_documents, split_tokens
from ragkit.errors import ConfigError
from ragkit.types import Document, token_hash

import pytest


def test_short_document_is_one_chunk(word_tokenizer):
    doc = Document("d1", "One short sentence. Another one.", title="T")
    chunks = list(chunk_documents([doc], word_tokenizer, size=50, overlap=5))
    assert len(chunks) == 1
    c = chunks[0]
    assert c.id == "d1#0" and c.doc_id == "d1" and c.title == "T"
    assert c.text == doc.text and c.span == (0, len(doc.text))
    assert c.content_hash == token_hash(c.token_ids)


def test_long_document_prefers_sentence_ends(word_tokenizer):
    text = " ".join(f"Sentence {i} has five words." for i in range(40))
    chunks = list(chunk_documents([Document("d", text)], word_tokenizer, size=32, overlap=4))
    assert len(chunks) > 1
    assert all(len(c.token_ids) <= 32 for c in chunks)
    assert all(c.text.rstrip().endswith(".") for c in chunks)
    assert [c.id for c in chunks] == [f"d#{i}" for i in range(len(chunks))]


def test_chunk_ids_and_hashes_are_stable(word_tokenizer):
    doc = Document("x", "alpha beta gamma. " * 100)
    first = [(c.id, c.content_hash) for c in chunk_documents([doc], word_tokenizer, 20, 3)]
    second = [(c.id, c.content_hash) for c in chunk_documents([doc], word_tokenizer, 20, 3)]
    assert first == second


def test_bad_sizes_name_the_key(word_tokenizer):
    with pytest.raises(ConfigError, match="chunking.size"):
        list(chunk_documents([Document("d", "x")], word_tokenizer, 0, 0))
    with pytest.raises(ConfigError, match="chunking.overlap"):
        list(chunk_documents([Document("d", "x")], word_tokenizer, 10, 10))


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from(["a", "bb", "ccc.", "dd!", "e\n", "f?"]), min_size=1, max_size=300),
       size=st.integers(2, 40), overlap_frac=st.floats(0, 0.9))
def test_spans_cover_document_without_gaps(words, size, overlap_frac):
    from tests.conftest import WordTokenizer

    text = " ".join(words)
    overlap = min(int(size * overlap_frac), size - 1)
    tok = WordTokenizer()
    enc = tok([text])
    windows = split_tokens(text, enc["offset_mapping"][0], size, overlap)
    n = len(enc["input_ids"][0])
    assert windows[0][0] == 0 and windows[-1][1] == n
    for (s1, e1), (s2, e2) in zip(windows, windows[1:]):
        assert s2 <= e1, "gap between consecutive chunks"
        assert s2 > s1, "no progress"
    assert all(0 < e - s <= size for s, e in windows)
    chunks = list(chunk_documents([Document("d", text)], tok, size, overlap))
    for a, b in zip(chunks, chunks[1:]):
        assert b.span[0] <= a.span[1]
    assert chunks[0].span[0] == 0 and chunks[-1].span[1] == len(text)


def test_real_tokenizer_ids_match_slices(smollm2_tokenizer):
    text = "Retrieval picks chunks. The generator reuses their KV caches! " * 30
    chunks = list(chunk_documents([Document("d", text)], smollm2_tokenizer, size=64, overlap=8))
    whole = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(chunks) > 1
    assert list(chunks[0].token_ids) == whole[: len(chunks[0].token_ids)]
    assert all(len(c.token_ids) <= 64 for c in chunks)
