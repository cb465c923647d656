"""Token-bounded chunking with the generator's tokenizer.

Chunks are counted in the generator's tokens because the chunk cache stores one KV entry per
chunk: the chunk's token ids here are exactly the ids the generator will see (each document is
tokenised once, without special tokens, and sliced), and their hash is the cache key.
Boundaries prefer sentence ends so that a chunk reads as whole sentences.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from ragkit.errors import ConfigError
from ragkit.types import Chunk, Document, token_hash

SENTENCE_END = (".", "!", "?", "\n", ";", ":")


def _sentence_breaks(text: str, offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """breaks[i] is True when a chunk may end after token i (the token closes a sentence)."""
    breaks = []
    last_visible, scanned = "", 0  # the last non-space character of text[:scanned]
    for i, (_start, end) in enumerate(offsets):
        if end >= scanned:  # one pass over the text: slicing text[:end] per token was quadratic
            visible = text[scanned:end].rstrip()
            last_visible = visible[-1] if visible else last_visible
            scanned = end
            before_end = last_visible
        else:
            before_end = text[:end].rstrip()[-1:]
        closing = before_end in SENTENCE_END if end else False
        next_starts_fresh = i + 1 == len(offsets) or text[end:end + 1].isspace() or text[end - 1:end] == "\n"
        breaks.append(closing and next_starts_fresh)
    return breaks


def split_tokens(text: str, offsets: Sequence[tuple[int, int]], size: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows [start, end) of at most `size` tokens, consecutive windows sharing about
    `overlap` tokens; an end falls on a sentence boundary when one lies in the window's second half."""
    n = len(offsets)
    if n <= size:
        return [(0, n)]
    breaks = _sentence_breaks(text, offsets)
    windows = []
    start = 0
    while True:
        end = min(start + size, n)
        if end < n:
            for cut in range(end, start + size // 2, -1):
                if breaks[cut - 1]:
                    end = cut
                    break
        windows.append((start, end))
        if end >= n:
            return windows
        start = max(end - overlap, start + 1)


def chunk_documents(docs: Iterable[Document], tokenizer, size: int, overlap: int,
                    batch_size: int = 256) -> Iterator[Chunk]:
    """Chunk documents in order; `tokenizer` is a Hugging Face fast tokenizer (offsets needed)."""
    if size <= 0:
        raise ConfigError("chunking.size", f"must be > 0, got {size}")
    if not 0 <= overlap < size:
        raise ConfigError("chunking.overlap", f"must be in [0, chunking.size), got {overlap}")
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == batch_size:
            yield from _chunk_batch(batch, tokenizer, size, overlap)
            batch = []
    if batch:
        yield from _chunk_batch(batch, tokenizer, size, overlap)


def _chunk_batch(docs: list[Document], tokenizer, size: int, overlap: int) -> Iterator[Chunk]:
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False, return_offsets_mapping=True)
    for doc, ids, offsets in zip(docs, encoded["input_ids"], encoded["offset_mapping"]):
        n_tokens = len(ids)
        for n, (start, end) in enumerate(split_tokens(doc.text, offsets, size, overlap)):
            token_ids = tuple(ids[start:end])
            # The first and last chunk reach the document's ends, whitespace the tokenizer skipped included.
            first = 0 if start == 0 else offsets[start][0]
            last = len(doc.text) if end == n_tokens else offsets[end - 1][1]
            span = (first, last)
            yield Chunk(
                id=Chunk.make_id(doc.id, n),
                doc_id=doc.id,
                text=doc.text[span[0]:span[1]],
                token_ids=token_ids,
                span=span,
                content_hash=token_hash(token_ids),
                title=doc.title,
                metadata=doc.metadata,
            )
