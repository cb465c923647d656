"""The RAG prompt's pieces, tokenised apart (chunks keep the ids their cached KV belongs to), concatenate
to the ids of the rendered chat tokenised whole: what an OpenAI-compatible endpoint sees is what the
local decoder computes."""

from __future__ import annotations

import pytest

from generators.prompt import ChatPrompt, rag_messages
from ragkit.types import Chunk

SYSTEM = "Answer from the documents."


def _chunk(prompt: ChatPrompt, i: int, text: str, title: str) -> Chunk:
    return Chunk(id=f"c{i}", doc_id=f"d{i}", text=text, token_ids=prompt.chunk_ids(text), span=(0, len(text)),
                 content_hash=f"h{i}", title=title)


@pytest.mark.parametrize("titles", [False, True])
def test_segments_concatenate_to_the_whole_rendered_chat(smollm2_tokenizer, titles):
    prompt = ChatPrompt(smollm2_tokenizer, SYSTEM)
    texts = ["Paris is the capital of France.", "The 1998 final (Stade de France) ended 3-0.",
             "Zidane scored twice!", "42"]
    chunks = [_chunk(prompt, i, text, f"Doc {i}" if titles else "") for i, text in enumerate(texts)]
    question = "Who won the 1998 final?"
    pieces = [i for segment in prompt.segments(question, chunks) for i in segment.token_ids]
    rendered = smollm2_tokenizer.apply_chat_template(rag_messages(SYSTEM, question, chunks), tokenize=False,
                                                     add_generation_prompt=True)
    assert pieces == prompt.ids(rendered)
    assert prompt.size(question, chunks) == len(pieces)


def test_a_separator_is_tokenised_as_running_text(smollm2_tokenizer):
    prompt = ChatPrompt(smollm2_tokenizer, SYSTEM)
    assert list(prompt.separator_ids) == prompt.ids("\n\nQuestion")[:-1]
    assert len(prompt.separator_ids) == 2  # "\n", "\n" before a word, not the lone "\n\n" token
