"""The server's Service: one Pipeline kept for the process's lifetime, so the model stays loaded
and the KV store's memory tiers stay warm from one request to the next.

`start(ticket)` turns a job into a request of the pipeline's batched engine (driven by the
EngineScheduler): retrieve (through the config's [query] and [rerank], as every answer does; /search
gives the first stage alone), then a request carrying the job's own mode, budget and temperature, with an
on_token callback that streams text and applies stop strings and the output cap (where the
output ends, the scheduler stops the request's row). Only `Pipeline` is reached from here.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ragkit.pipeline import Pipeline
from ragkit.serve.scheduler import Started, Ticket


class PipelineService:
    def __init__(self, pipeline: Pipeline, max_output_chars: int, max_batch: int):
        self.pipeline = pipeline
        self.max_output_chars = max_output_chars
        self._retrieval = threading.Lock()  # /search and the worker share the retrievers
        self.engine = pipeline.engine  # loads the model now, not on the first request
        self.engine.max_batch = max_batch
        self.pipeline.retrievers  # and the index
        # Requests are measured on the event loop while the worker tokenizes: the loop counts with its own
        # tokenizer (Pipeline.token_counter).
        self.count_tokens = pipeline.token_counter()

    @property
    def name(self) -> str:
        return self.pipeline.config.name

    @property
    def model(self) -> str:
        return self.pipeline.config.generator.model

    def question_room(self, k: int, max_tokens: int) -> int:
        """Tokens a question may take so that prompt and answer fit the model's context."""
        return self.pipeline.question_room(k, max_tokens)

    def search(self, question: str, k: int) -> list[dict[str, Any]]:
        with self._retrieval:
            hits = self.pipeline.retrieve(question, k=k)
        return [self._hit(h) for h in hits]

    def _hit(self, hit) -> dict[str, Any]:
        chunk = self.pipeline.chunk(hit.id)
        return {"id": hit.id, "doc_id": chunk.doc_id, "rank": hit.rank, "score": round(float(hit.score), 6),
                "title": chunk.title, "text": chunk.text}

    def start(self, ticket: Ticket) -> Started:
        job = ticket.job
        hits = []
        if job.k:  # on the worker thread, the engine's: [query] and [rerank] may run the model
            with self._retrieval:
                hits = [self._hit(h) for h in self.pipeline.answer_hits([job.question], k=job.k)[0]]
        ticket.emit("retrieved", hits)
        chunks = [self.pipeline.chunk(h["id"]) for h in hits]
        output = _Output(ticket, self.max_output_chars)
        whole = job.messages is not None  # a plain chat: its messages are the prompt, nothing to reuse
        request = self.pipeline.request(job.messages if whole else job.question, chunks,
                                        mode="full" if whole else job.mode, max_new_tokens=job.max_tokens,
                                        temperature=job.temperature, on_token=output.add)

        def finish(answer) -> None:
            output.finish()
            budget_spent = not output.stopped and len(answer.tokens) >= job.max_tokens
            ticket.emit("done", {
                "answer": output.text.strip(), "chunk_ids": answer.chunk_ids, "mode": answer.mode,
                "ttft_s": round((output.first_token_at or time.monotonic()) - job.arrived, 4),
                "prefill_s": round(answer.ttft_s, 4), "total_s": round(time.monotonic() - job.arrived, 4),
                "cache_hits": answer.cache_hits, "context_tokens": answer.context_tokens,
                "recomputed_tokens": answer.recomputed_tokens, "completion_tokens": len(answer.tokens),
                "finish_reason": "length" if output.truncated or budget_spent else "stop"})

        return Started(request, finish, lambda: output.ended)

    def cache_stats(self) -> dict[str, Any]:
        return self.pipeline.cache_stats()

    def flush(self) -> None:
        """Every stored chunk on disk and the KV store's queued hit counts in its disk journal."""
        self.pipeline.flush()


class _Output:
    """Streams decoded text to the ticket; holds back what could be the start of a stop string,
    cuts at the first stop string or at the size cap, then emits nothing more."""

    def __init__(self, ticket: Ticket, max_chars: int):
        self.ticket, self.max_chars = ticket, max_chars
        self.stops = ticket.job.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.first_token_at: float | None = None
        self.ended = self.stopped = self.truncated = False

    def add(self, piece: str) -> None:
        self.first_token_at = self.first_token_at or time.monotonic()
        if self.ended:
            return
        self.text += piece
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.ended, self.stopped = self.text[:cut], True, True
        elif len(self.text) > self.max_chars:
            self.text, self.ended, self.truncated = self.text[:self.max_chars], True, True
        self._send(len(self.text) if self.ended else len(self.text) - self.hold)

    def finish(self) -> None:
        self._send(len(self.text))

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.ticket.emit("token", self.text[self.sent:upto])
            self.sent = upto

