"""Request bodies and the server's limits: what a client may choose, and within which bounds.

A request chooses a question, how many chunks (k), a reuse mode the server allows (of chunk_cache.modes) and decoding
settings within limits. Nothing in a body names a file, a model, a config key or a cache folder:
unknown fields are refused (422 naming the field). The OpenAI `model` field is accepted for
compatibility and only echoed back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ragkit.serve.scheduler import Job

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64


class FieldError(Exception):
    """A value that passed the schema but not the server's limits: answered as 422 naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Stop = Union[str, list[str], None]


class SearchRequest(_Body):
    question: str
    k: int | None = None


class AnswerRequest(_Body):
    question: str
    k: int | None = None
    mode: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    stop: Stop = None
    stream: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # clients add `name` and the like
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    model: str | None = Field(default=None, max_length=200)
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    stop: Stop = None
    n: int = 1
    user: str | None = Field(default=None, max_length=200)
    stream_options: dict | None = None
    # ragkit's own: how many chunks to retrieve and the reuse mode (through extra_body in the openai client).
    k: int | None = None
    mode: str | None = None


class PreferenceRequest(_Body):
    question: str
    system_a: str
    system_b: str
    answer_a: str
    answer_b: str
    preference: Literal["a", "b", "tie", "both_bad"]


@dataclass(frozen=True)
class Limits:
    """The bounds a request must stay within; set by the operator (CLI flags), never by a request."""

    modes: tuple[str, ...]
    default_mode: str
    default_k: int
    max_k: int
    default_max_tokens: int
    max_tokens: int
    max_temperature: float = 2.0
    max_question_chars: int = 8000
    max_output_chars: int = 16000
    max_body_bytes: int = 64 << 10
    deadline_s: float = 120.0

    def k(self, value: int | None, whole_prompt: bool = False) -> int:
        """Chunks to retrieve; a chat may say 0: no retrieval, its messages are the whole prompt."""
        k = self.default_k if value is None else value
        if not (0 if whole_prompt else 1) <= k <= self.max_k:
            raise FieldError("k", f"must be between {0 if whole_prompt else 1} and {self.max_k}, got {k}")
        return k

    def question(self, value: str, field: str = "question", whole_prompt: bool = False) -> str:
        """A question within max_question_chars; a whole prompt (k = 0) is bounded by the context instead."""
        text = value.strip()
        if not text:
            raise FieldError(field, "must not be empty")
        if not whole_prompt and len(text) > self.max_question_chars:
            raise FieldError(field, f"{len(text)} characters; at most {self.max_question_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise FieldError(field, f"not valid Unicode ({exc.reason} at character {exc.start})") from None
        return text

    def job(self, service, question: str, *, k: int | None, mode: str | None, max_tokens: int | None,
            temperature: float | None, stop: Stop, question_field: str = "question",
            messages: list[dict[str, str]] | None = None) -> Job:
        k = self.k(k, whole_prompt=messages is not None)
        question = self.question(question, question_field, whole_prompt=k == 0)
        mode = self.default_mode if mode is None else mode
        if mode not in self.modes:
            raise FieldError("mode", f"unknown mode {mode!r}; allowed: {', '.join(self.modes)}")
        tokens = self.default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= tokens <= self.max_tokens:
            raise FieldError("max_tokens", f"must be between 1 and {self.max_tokens}, got {tokens}")
        temperature = 0.0 if temperature is None else temperature
        if not 0.0 <= temperature <= self.max_temperature:
            raise FieldError("temperature", f"must be between 0 and {self.max_temperature}, got {temperature}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise FieldError("stop", f"at most {MAX_STOP_STRINGS} non-empty strings of up to {MAX_STOP_CHARS} "
                             "characters")
        room = service.question_room(k, tokens)
        used = service.count_tokens(question if messages is None or k else "\n".join(m["content"] for m in messages))
        if used > room:
            raise FieldError(question_field, f"{used} tokens; with k={k} chunks and max_tokens={tokens} the "
                             f"model's context leaves room for {max(room, 0)}")
        return Job(question, k, mode, tokens, temperature, stops, deadline=time.monotonic() + self.deadline_s,
                   messages=messages if k == 0 else None)

    def public(self) -> dict:
        return {"modes": list(self.modes), "default_mode": self.default_mode, "default_k": self.default_k,
                "max_k": self.max_k, "default_max_tokens": self.default_max_tokens, "max_tokens": self.max_tokens,
                "max_temperature": self.max_temperature, "max_question_chars": self.max_question_chars,
                "max_output_chars": self.max_output_chars, "max_body_bytes": self.max_body_bytes,
                "deadline_s": self.deadline_s}
