"""The seam between the HTTP routes and whatever answers: submit a Job, read its events from a Ticket.

Routes only call `Scheduler.submit(job) -> Ticket`, iterate the ticket's events and call
`ticket.cancel()` (client gone, deadline passed). `EngineScheduler` puts jobs through the
batched engine (generators/engine.py): new jobs join the running batch between decode steps.

Events, in order: `retrieved` (ranked chunks), `token` (text pieces, zero or more), then exactly
one of `done` (the answer's figures) or `error` ({"status", "message"}): the iteration ends there.
A cancelled job emits nothing more and frees its place in the queue, or its slot once the
engine next looks (between decode steps).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

log = logging.getLogger("ragkit.serve")


@dataclass
class Job:
    """One answer request, already validated against the server's limits."""

    question: str
    k: int
    mode: str
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]
    deadline: float  # time.monotonic() by which the answer must be complete
    arrived: float = field(default_factory=time.monotonic)
    messages: list[dict[str, str]] | None = None  # k = 0: the chat as the whole prompt (no retrieval, full prefill)


CANCELLED = {"status": 499, "message": "the request was cancelled"}


@dataclass(frozen=True)
class Event:
    kind: str  # retrieved | token | done | error
    data: Any


class QueueFull(Exception):
    def __init__(self, retry_after_s: int, why: str = "the server's queue is full"):
        super().__init__(f"{why}; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    def __init__(self):
        super().__init__("the server is shutting down; retry against another instance")


class Cancelled(Exception):
    """Raised by `Ticket.check`: nobody waits for this job any more."""


class Ticket:
    """A submitted job's event stream, read by one route on the event loop, fed from any thread."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, release: Callable[["Ticket"], None]):
        self.job = job
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._release = release
        self._cancelled = threading.Event()
        self._ended = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self) -> bool:
        return time.monotonic() > self.job.deadline

    def check(self) -> None:
        """For the engine between steps: stop here if the client left or the deadline passed."""
        if self.cancelled or self.expired():
            raise Cancelled()

    def emit(self, kind: str, data: Any) -> None:
        """Push an event (thread-safe). Nothing is delivered after a cancel."""
        if not self.cancelled:
            self._loop.call_soon_threadsafe(self._events.put_nowait, Event(kind, data))

    def fail(self, status: int, message: str) -> None:
        self.emit("error", {"status": status, "message": message})

    def cancel(self) -> None:
        """The reader is gone: free the queue place or slot, and wake a reader still waiting (idempotent)."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._release(self)
            self._loop.call_soon_threadsafe(self._events.put_nowait, Event("error", CANCELLED))

    def __aiter__(self) -> "Ticket":
        return self

    async def __anext__(self) -> Event:
        """The next event; past the job's deadline the job is cancelled and a 504 error ends the stream."""
        if self._ended:
            raise StopAsyncIteration
        try:
            event = await asyncio.wait_for(self._events.get(), timeout=max(0.0, self.job.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.cancel()
            event = Event("error", {"status": 504, "message": "the request passed its deadline and was cancelled"})
        self._ended = event.kind in ("done", "error")
        return event


class Scheduler(Protocol):
    def submit(self, job: Job) -> Ticket:
        """Queue a job (call on the event loop); raises QueueFull or ShuttingDown."""

    @property
    def queue_length(self) -> int:
        """Jobs waiting for a slot."""

    @property
    def running(self) -> int:
        """Jobs being answered now."""

    def drain(self) -> None:
        """Refuse new jobs and end queued ones with a 503 error; running jobs go on."""

    def close(self, timeout_s: float) -> None:
        """Drain, then wait up to timeout_s for running jobs to end."""


class Engine(Protocol):
    """The batched engine as the scheduler drives it (generators.engine.AnswerEngine; a model-free one in tests)."""

    max_batch: int
    idle: bool

    def submit(self, request: Any) -> int: ...

    def step(self) -> list[tuple[int, Any]]: ...

    def cancel(self, ticket: int) -> bool: ...

    def stop(self, ticket: int) -> Any: ...


@dataclass
class Started:
    """A job turned into an engine request."""

    request: Any  # its on_token streams to the ticket and never raises
    finish: Callable[[Any], None]  # emits `done` from the engine's answer
    ended: Callable[[], bool] = lambda: False  # the output wants no more tokens (a stop string, the size cap)


class Service(Protocol):
    """The one thing that serves (service.PipelineService; a model-free one in tests): what the routes
    ask of it, and what turns a job into an engine request for this scheduler."""

    name: str
    model: str
    engine: Engine

    def question_room(self, k: int, max_tokens: int) -> int: ...
    def count_tokens(self, text: str) -> int: ...
    def search(self, question: str, k: int) -> list[dict[str, Any]]: ...
    def cache_stats(self) -> dict[str, Any]: ...
    def flush(self) -> None: ...

    def start(self, ticket: Ticket) -> Started:
        """Retrieve and emit `retrieved`, then make the engine request."""


PACE_MARGIN = 0.2  # the share of a job's remaining time kept in reserve when admitting it


class EngineScheduler:
    """One thread drives the batched engine: between decode steps it drops the jobs whose client
    left or whose deadline passed (their batch rows are freed), stops those whose output ended on a
    stop string or the size cap (answered at once, their rows freed too), and admits waiting jobs into free
    rows, first come, first served. At most `queue_size` jobs wait, and none that would finish past
    its deadline at the recent pace: the later of (a job's time in the batch x the batches ahead of
    it) and (the jobs ahead of it, plus itself, x the time between answers while busy). The second
    term is what a loaded server's throughput allows; the first alone trusts a pace measured at a
    lighter load, and admits jobs that then time out. Until a busy gap is measured, a job's whole
    time in the batch stands in for it (no gain from batching assumed). Paces jitter, so a job is
    admitted only if it would finish with PACE_MARGIN of its remaining time to spare.

    A failure inside the engine is a bug, not a client's fault: the running jobs get a 500 error
    event and the loop goes on.
    """

    def __init__(self, service: Service, queue_size: int):
        self._service = service
        self._engine = service.engine
        self.queue_size = queue_size
        self._pending: deque[Ticket] = deque()
        self._running: dict[int, tuple[Ticket, Started, float]] = {}  # engine ticket -> job, its start time
        self._cond = threading.Condition()
        self._closing = False
        self._service_s = 0.0  # moving average of one job's time in the batch (0 until measured)
        self._gap_s = 0.0  # moving average of the time between answers while jobs kept waiting (0 until measured)
        self._last_answer = 0.0  # time.monotonic() of the last answers
        self._busy_after_answer = False  # whether jobs were left running or waiting then
        self._thread = threading.Thread(target=self._run, name="ragkit-serve-engine", daemon=True)
        self._thread.start()

    @property
    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> Ticket:
        ticket = Ticket(job, asyncio.get_running_loop(), self._release)
        with self._cond:
            if self._closing:
                raise ShuttingDown()
            ahead = len(self._pending) + self.running
            # Full, or so far behind that the job would finish past its deadline: refuse it now, not later.
            retry_after = max(1, math.ceil(self._expected_s(ahead - 1)))
            if len(self._pending) >= self.queue_size:
                raise QueueFull(retry_after)
            if self._expected_s(ahead) > (1 - PACE_MARGIN) * (job.deadline - time.monotonic()):
                raise QueueFull(retry_after, "the server is too busy to answer within the deadline")
            self._pending.append(ticket)
            self._cond.notify()
        return ticket

    def _expected_s(self, ahead: int) -> float:
        """Seconds until a job with `ahead` jobs before it is answered, at the recent pace (0 while unknown)."""
        per_answer = self._gap_s or self._service_s
        return max(self._service_s * (ahead // self._engine.max_batch + 1), per_answer * (ahead + 1))

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._pending:
                self._pending.remove(ticket)

    def drain(self) -> None:
        with self._cond:
            self._closing = True
            queued, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for ticket in queued:
            ticket.fail(503, "the server is shutting down; this request was not started, retry it")

    def close(self, timeout_s: float) -> None:
        self.drain()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._running and not self._closing:
                    self._cond.wait()
                if not self._pending and not self._running:
                    return
                admitted = []
                while self._pending and len(self._running) + len(admitted) < self._engine.max_batch:
                    admitted.append(self._pending.popleft())
            for ticket in admitted:
                self._start(ticket)
            self._step()

    def _start(self, ticket: Ticket) -> None:
        if ticket.expired():
            ticket.fail(504, "the request passed its deadline while queued")
            return
        try:
            started = self._service.start(ticket)
            ticket.check()
            self._running[self._engine.submit(started.request)] = (ticket, started, time.monotonic())
        except Cancelled:
            pass
        except Exception as exc:
            log.exception("starting an answer failed")
            ticket.fail(500, f"internal error while answering ({type(exc).__name__}); the server goes on")

    def _step(self) -> None:
        finished = []
        for number, (ticket, started, _) in list(self._running.items()):
            if ticket.cancelled or ticket.expired():  # the client left or the deadline passed: free the row
                self._engine.cancel(number)
                del self._running[number]
            elif started.ended():
                finished.append((number, self._engine.stop(number)))
        if len(finished) < len(self._running):
            try:
                finished += self._engine.step()
            except Exception as exc:
                log.exception("answering failed")
                for number, (ticket, _, _) in self._running.items():
                    self._engine.cancel(number)
                    ticket.fail(500, f"internal error while answering ({type(exc).__name__}); the server goes on")
                self._running.clear()
                return
        now = time.monotonic()
        if finished and self._busy_after_answer:  # the server worked throughout: the gap is its pace
            gap = (now - self._last_answer) / len(finished)
            self._gap_s = 0.8 * self._gap_s + 0.2 * gap if self._gap_s else gap
        if finished:
            self._last_answer = now
            self._busy_after_answer = len(self._running) > len(finished) or bool(self._pending)
        for number, answer in finished:
            ticket, started, since = self._running.pop(number)
            took = now - since  # the pace, from answers that ran to the end
            self._service_s = 0.8 * self._service_s + 0.2 * took if self._service_s else took
            try:
                started.finish(answer)
            except Exception as exc:
                log.exception("reporting an answer failed")
                ticket.fail(500, f"internal error while answering ({type(exc).__name__}); the server goes on")
