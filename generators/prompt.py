"""The RAG prompt as token segments: chat-template head, retrieved chunks, question tail.

The model's chat template is rendered once around a placeholder and split there, so any chat
model gets its own template. Every piece is tokenised on its own and the ids concatenated:
a chunk's ids in the prompt are exactly `Chunk.token_ids`, the ids its cached KV belongs to.
Generation stops on the model's own eos ids (ModelInfo.eos_ids) and end-of-turn marks.
The prompt's budget is counted here only: `size` (exact, for a question and its chunks) and `room`
(what is left for a question before retrieval, with `chunk_allowance` per chunk).
"""

from __future__ import annotations

from collections.abc import Iterable

from chunk_cache.assembly import CHUNK, GAP, HEAD, QUESTION, TITLE, Segment
from ragkit.types import Chunk

_SLOT = "\x00RAGKIT_USER\x00"
TITLE_ALLOWANCE = 24  # tokens kept for a chunk's title line when the title is not known yet
# End-of-turn markers of the supported chat families (Qwen/SmolLM, Llama 3, Gemma, Phi-3, Granite/OLMo);
# generation stops on any present in the vocabulary, and on every eos id the model folder declares.
_END_OF_TURN = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>",
                "<end_of_turn>", "<|end|>"]


class ChatPrompt:
    def __init__(self, tokenizer, system_prompt: str, eos_ids: Iterable[int] = ()):
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
        self.separator_ids = tuple(self.ids_before_text("\n\n"))
        self.tail_text = tail
        vocab = tokenizer.get_vocab()
        stops = {tokenizer.eos_token_id} | {vocab[t] for t in _END_OF_TURN if t in vocab}
        stops |= {i for i in eos_ids if i < len(vocab)}  # the model folder's declared eos ids
        self.stop_ids = frozenset(s for s in stops if s is not None)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def ids_before_text(self, text: str) -> list[int]:
        """`text`'s ids as the whole prompt's tokenisation gives them where more text follows: a byte-level
        BPE splits "\n\n" before a word into two newlines, not the one token it is alone. So the pieces
        concatenate to the ids of the rendered text, and an endpoint that tokenises the chat whole sees
        the same prompt."""
        probe = self.ids("Question")
        whole = self.ids(text + "Question")
        return whole[:-len(probe)] if whole[-len(probe):] == probe else self.ids(text)

    def chunk_ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.ids(text))

    def size(self, question: str | list[dict[str, str]], chunks: list[Chunk]) -> int:
        """Prompt rows of `question` over `chunks`, exactly."""
        return sum(len(seg.token_ids) for seg in self.segments(question, chunks))

    def chunk_allowance(self, chunk_tokens: int) -> int:
        """Rows a chunk of at most `chunk_tokens` tokens takes with its title and separator."""
        return chunk_tokens + TITLE_ALLOWANCE + len(self.separator_ids)

    def room(self, context_length: int, chunk_rows: int, max_new_tokens: int) -> int:
        """Tokens a question's text may take when the chunks take `chunk_rows` rows and the answer
        `max_new_tokens`, within `context_length` (the question's wrapper and the reply header counted)."""
        wrapper = len(self.ids("Question: " + self.tail_text))
        return context_length - len(self.head_ids) - chunk_rows - wrapper - max_new_tokens

    def segments(self, question: str | list[dict[str, str]], chunks: list[Chunk]) -> list[Segment]:
        """The head, then per chunk [title] chunk separator, then the question and the reply header. A
        question given as chat messages is a whole prompt (a plain chat request, no chunks): the template
        renders it as it is, and nothing of it is cached or reused."""
        if not isinstance(question, str):
            text = self.tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
            return [Segment(QUESTION, tuple(self.ids(text)))]
        segments = [Segment(HEAD, self.head_ids)]
        for chunk in chunks:
            if chunk.title:
                segments.append(Segment(TITLE, tuple(self.ids(f"Title: {chunk.title}\n"))))
            segments.append(Segment(CHUNK, tuple(chunk.token_ids)))
            segments.append(Segment(GAP, self.separator_ids))
        segments.append(Segment(QUESTION, tuple(self.ids(f"Question: {question}" + self.tail_text))))
        return segments


def rag_messages(system_prompt: str, question: str, chunks: list[Chunk]) -> list[dict[str, str]]:
    """The RAG prompt as chat messages, for an endpoint: a chat template renders them to the very text
    whose pieces ChatPrompt.segments tokenises (head and "Documents:", [title] chunk separator, question)."""
    documents = "".join((f"Title: {c.title}\n" if c.title else "") + c.text + "\n\n" for c in chunks)
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": f"Documents:\n{documents}Question: {question}"}]
