"""The RAG prompt as token segments: chat-template head, retrieved chunks, question tail.

The model's chat template is rendered once around a placeholder and split there, so any chat
model gets its own template. Every piece is tokenised on its own and the ids concatenated:
a chunk's ids in the prompt are exactly `Chunk.token_ids`, the ids its cached KV belongs to.
"""

from __future__ import annotations

from chunk_cache.assembly import CHUNK, GAP, PREFIX, QUESTION, TITLE, Segment
from ragkit.types import Chunk

_SLOT = "\x00RAGKIT_USER\x00"
# End-of-turn markers of the supported chat families; generation stops on any present in the vocabulary.
_END_OF_TURN = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>"]


class ChatPrompt:
    def __init__(self, tokenizer, system_prompt: str):
        self.tokenizer = tokenizer
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": _SLOT}]
        if getattr(tokenizer, "chat_template", None):
            try:
                rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # templates without a system role (Mistral) raise; fold it into the user turn
                messages = [{"role": "user", "content": f"{system_prompt}\n\n{_SLOT}"}]
                rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            rendered = f"{system_prompt}\n\n{_SLOT}\nAnswer:"
        head, tail = rendered.split(_SLOT)
        bos = tokenizer.bos_token
        add_bos = bos is not None and getattr(tokenizer, "add_bos_token", False) and not head.startswith(bos)
        self.head_ids = tuple(([tokenizer.bos_token_id] if add_bos else []) + self.ids(head + "Documents:\n"))
        self.separator_ids = tuple(self.ids("\n\n"))
        self.tail_text = tail
        vocab = tokenizer.get_vocab()
        stops = {tokenizer.eos_token_id} | {vocab[t] for t in _END_OF_TURN if t in vocab}
        self.stop_ids = frozenset(s for s in stops if s is not None)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chunk_ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.ids(text))

    def segments(self, question: str, chunks: list[Chunk]) -> list[Segment]:
        """prefix, then per chunk [title] chunk separator, then the question and the reply header."""
        segments = [Segment(PREFIX, self.head_ids)]
        for chunk in chunks:
            if chunk.title:
                segments.append(Segment(TITLE, tuple(self.ids(f"Title: {chunk.title}\n"))))
            segments.append(Segment(CHUNK, tuple(chunk.token_ids), chunk))
            segments.append(Segment(GAP, self.separator_ids))
        segments.append(Segment(QUESTION, tuple(self.ids(f"Question: {question}" + self.tail_text))))
        return segments
