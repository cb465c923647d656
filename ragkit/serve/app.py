"""The HTTP API (FastAPI): search, answer (JSON or server-sent events), OpenAI-compatible chat,
the web page and its arena, health and Prometheus metrics.

Every error is JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
`param` naming the offending field: 400 for a body that is not JSON, 422 for a field the schema
or the server's limits refuse, 401 for a missing or wrong API key, 413 for an oversize body,
429 (with Retry-After) when the queue is full, 503 while shutting down, 504 past the deadline.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ragkit.serve.arena import PreferenceLog
from ragkit.serve.metrics import ServeMetrics
from ragkit.serve.scheduler import QueueFull, Scheduler, Service, ShuttingDown, Ticket, log
from ragkit.serve.schemas import AnswerRequest, FieldError, Limits, PreferenceRequest, SearchRequest

PAGE = Path(__file__).with_name("page.html")
ROUTES = ("/", "/health", "/info", "/metrics", "/search", "/answer", "/arena/preference", "/v1/models",
          "/v1/chat/completions")


@dataclass
class Server:
    """Everything the routes share."""

    service: Service
    scheduler: Scheduler
    limits: Limits
    api_key: str | None
    arena: PreferenceLog
    metrics: ServeMetrics
    drain_timeout_s: float = 30.0
    draining: bool = False


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 413: "invalid_request_error", 429: "rate_limit_error",
            503: "server_shutting_down", 504: "timeout"}.get(status, "invalid_request_error" if status < 500
                                                              else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that cancel their ticket when the stream ends for any reason
    (finished, client gone, server stopping)."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class RequestGuard:
    """Pure ASGI middleware: refuses bodies over `max_body` bytes (413) before any parsing, and
    counts every response by route and status for /metrics."""

    def __init__(self, app, max_body: int, metrics: ServeMetrics):
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = {"code": 500}

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                response = error(413, f"request body over {self.max_body} bytes", "body")
                return await response(scope, receive, counting_send)
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: the disconnect, when it comes

            await self.app(scope, replay, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()

    async def _read_body(self, scope, receive) -> bytes | None:
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def create_app(server: Server) -> FastAPI:
    from ragkit.serve.openai_routes import add_openai_routes

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        server.draining = True
        await asyncio.to_thread(server.scheduler.close, server.drain_timeout_s)
        await asyncio.to_thread(server.service.flush)

    app = FastAPI(title="ragkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(RequestGuard, max_body=server.limits.max_body_bytes, metrics=server.metrics)
    _add_error_handlers(app)
    auth = Depends(_authorise(server.api_key))
    limits, service, scheduler = server.limits, server.service, server.scheduler

    @app.get("/health")
    async def health() -> dict:
        return {"status": "draining" if server.draining else "ok", "queue": scheduler.queue_length,
                "running": scheduler.running}

    @app.get("/", dependencies=[auth], response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'")})

    @app.get("/info", dependencies=[auth])
    async def info() -> dict:
        return {"name": service.name, "model": service.model, "limits": limits.public(),
                "arena": list(server.arena.systems)}

    @app.get("/metrics", dependencies=[auth])
    async def metrics() -> Response:
        cache = await asyncio.to_thread(service.cache_stats)
        return Response(server.metrics.render(scheduler, cache), media_type="text/plain; version=0.0.4")

    @app.post("/search", dependencies=[auth])
    async def search(body: SearchRequest) -> dict:
        question, k = limits.question(body.question), limits.k(body.k)
        return {"question": question, "k": k, "chunks": await asyncio.to_thread(service.search, question, k)}

    @app.post("/answer", dependencies=[auth])
    async def answer(body: AnswerRequest, request: Request) -> Response:
        job = limits.job(service, body.question, k=body.k, mode=body.mode, max_tokens=body.max_tokens,
                         temperature=body.temperature, stop=body.stop)
        ticket = scheduler.submit(job)
        if body.stream:
            return EventStream(_answer_events(ticket, server.metrics), ticket.cancel)
        result = await collect(ticket, request, server.metrics)
        if "error" in result:
            return error(result["error"]["status"], result["error"]["message"])
        return JSONResponse(result)

    @app.post("/arena/preference", dependencies=[auth])
    async def preference(body: PreferenceRequest) -> dict:
        row = await asyncio.to_thread(server.arena.record, body, limits)
        return {"recorded": True, "preference": row["preference"]}

    add_openai_routes(app, server, auth)
    return app


async def collect(ticket: Ticket, request: Request, metrics: ServeMetrics) -> dict:
    """Wait for a whole answer; a client that disconnects meanwhile cancels it."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        ticket.cancel()

    watcher = asyncio.create_task(watch())
    chunks, pieces = [], []
    try:
        async for event in ticket:
            if event.kind == "retrieved":
                chunks = event.data
            elif event.kind == "token":
                pieces.append(event.data)
            elif event.kind == "done":
                metrics.answered(event.data)
                return {**event.data, "chunks": chunks}
            else:
                return {"error": event.data}
        return {"error": {"status": 499, "message": "client disconnected"}}
    finally:
        watcher.cancel()
        ticket.cancel()


async def _answer_events(ticket: Ticket, metrics: ServeMetrics) -> AsyncIterator[str]:
    async for event in ticket:
        if event.kind == "done":
            metrics.answered(event.data)
        if event.kind == "error":
            yield sse(error_body(event.data["status"], event.data["message"]), "error")
        else:
            yield sse(event.data if event.kind != "token" else {"text": event.data}, event.kind)


def _authorise(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        offered = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not offered and request.url.path == "/":  # the page, opened in a browser as /?api_key=...
            offered = request.query_params.get("api_key", "")
        if not hmac.compare_digest(offered.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (send `Authorization: Bearer <key>`)",
                                headers={"WWW-Authenticate": "Bearer"})
    return check


# Tags pydantic adds to a location inside a union (`content.str`, `content.list[TextPart]`): not fields.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[A-Za-z_]+\[.*\])$")


def _field(loc: tuple) -> str:
    parts = [str(p) for p in (loc[1:] if loc and loc[0] == "body" else loc)]
    return ".".join(p for p in parts if not _UNION_TAG.match(p)) or "body"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "not valid JSON")
            return error(400, f"body: not valid JSON ({reason})", "body")
        field = _field(tuple(first.get("loc", ())))
        if field == "body" and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return error(422, "body: must be a JSON object (send Content-Type: application/json)", "body")
        if first.get("type") == "extra_forbidden":
            return error(422, f"{field}: unknown field; a request may not set it", field)
        return error(422, f"{field}: {first.get('msg', 'invalid value')}", field)

    @app.exception_handler(FieldError)
    async def refused(_request: Request, exc: FieldError) -> JSONResponse:
        return error(422, str(exc), exc.field)

    @app.exception_handler(QueueFull)
    async def full(_request: Request, exc: QueueFull) -> JSONResponse:
        return error(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(ShuttingDown)
    async def stopping(_request: Request, exc: ShuttingDown) -> JSONResponse:
        return error(503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def bug(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error(500, f"internal error ({type(exc).__name__}); the server goes on")

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not decode the body: not UTF-8, or nested too deeply
            return error(400, "body: not valid JSON (not UTF-8, or nested too deeply)", "body")
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
