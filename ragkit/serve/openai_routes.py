"""OpenAI-compatible `/v1/chat/completions` and `/v1/models`: the `openai` client works unchanged.

The last user message is the question; retrieval runs first and the answer comes from the
retrieved chunks under the server's own system prompt (other messages are not used). With ragkit's
`k: 0` nothing is retrieved and the messages are the whole prompt, computed in full: ragkit serve as a
plain LLM endpoint (what `generator.backend = "openai"` sends its RAG prompts to). Streaming
sends `data: {chat.completion.chunk}` lines and a final `data: [DONE]`. ragkit's figures (chunk ids,
TTFT, cache hits, tokens recomputed, mode) ride along under the `ragkit` key.
"""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ragkit.serve.app import EventStream, Server, collect, error, error_body, sse
from ragkit.serve.scheduler import Ticket
from ragkit.serve.schemas import ChatRequest, FieldError

FIGURES = ("chunk_ids", "mode", "ttft_s", "prefill_s", "cache_hits", "context_tokens",
           "recomputed_tokens")


def add_openai_routes(app: FastAPI, server: Server, auth) -> None:
    limits, service = server.limits, server.service

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "owned_by": "ragkit"}]}

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat(body: ChatRequest, request: Request) -> Response:
        users = [i for i, m in enumerate(body.messages) if m.role == "user"]
        if not users:
            raise FieldError("messages", "needs at least one message with role 'user' (the question)")
        if body.n != 1:
            raise FieldError("n", "only n=1 is supported")
        field = f"messages.{users[-1]}.content"
        job = limits.job(service, body.messages[users[-1]].text(), k=body.k, mode=body.mode,
                         max_tokens=body.max_tokens if body.max_tokens is not None else body.max_completion_tokens,
                         temperature=body.temperature, stop=body.stop, question_field=field,
                         messages=[{"role": m.role, "content": m.text()} for m in body.messages])
        ticket = server.scheduler.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": body.model or service.name}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return EventStream(_chunks(ticket, head, usage, server), ticket.cancel)
        result = await collect(ticket, request, server.metrics)
        if "error" in result:
            return error(result["error"]["status"], result["error"]["message"])
        return JSONResponse({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": result["answer"]},
            "finish_reason": result["finish_reason"]}], "usage": _usage(result, service, job.question),
            "ragkit": {key: result[key] for key in FIGURES}})


def _usage(done: dict, service, question: str) -> dict:
    """prompt_tokens counts the retrieved chunks' and the question's tokens (not the chat template's)."""
    prompt = done["context_tokens"] + service.count_tokens(question)
    return {"prompt_tokens": prompt, "completion_tokens": done["completion_tokens"],
            "total_tokens": prompt + done["completion_tokens"]}


async def _chunks(ticket: Ticket, head: dict, include_usage: bool, server: Server) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        return sse({**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    yield chunk({"role": "assistant", "content": ""})
    async for event in ticket:
        if event.kind == "token":
            yield chunk({"content": event.data})
        elif event.kind == "done":
            done = event.data
            server.metrics.answered(done)
            yield chunk({}, done["finish_reason"], ragkit={key: done[key] for key in FIGURES})
            if include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                           "usage": _usage(done, server.service, ticket.job.question)})
        elif event.kind == "error":
            yield sse(error_body(event.data["status"], event.data["message"]))
    yield sse("[DONE]")
