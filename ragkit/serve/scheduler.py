"""The seam between the HTTP routes and whatever answers: submit a Job, read its events from a Ticket.

Routes only call `Scheduler.submit(job) -> Ticket`, iterate the ticket's events and call
`ticket.cancel()` (client gone, deadline passed). Any engine that can push events onto a
ticket from its own thread fits behind this interface: `WorkerScheduler` answers one job at a
time on one thread today; the batched engine (jobs joining the running batch between decode
steps) can replace it without touching the routes.

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
    """Raised inside the engine (from a token callback) to stop a job nobody waits for."""


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


class WorkerScheduler:
    """One worker thread answers jobs first come, first served; at most `queue_size` wait, and none
    that would finish past its deadline at the recent pace (service time × (jobs ahead + 1)).

    `answer(ticket)` runs one job: it emits the ticket's events and calls `ticket.check()` often;
    Cancelled ends the job quietly, any other exception becomes a 500 error event.
    """

    def __init__(self, answer: Callable[[Ticket], None], queue_size: int):
        self._answer = answer
        self.queue_size = queue_size
        self._pending: deque[Ticket] = deque()
        self._current: Ticket | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._service_s = 0.0  # moving average of one job's time (0 until one is measured), for Retry-After
        self._thread = threading.Thread(target=self._run, name="ragkit-serve-worker", daemon=True)
        self._thread.start()

    @property
    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return int(self._current is not None)

    def submit(self, job: Job) -> Ticket:
        ticket = Ticket(job, asyncio.get_running_loop(), self._release)
        with self._cond:
            if self._closing:
                raise ShuttingDown()
            ahead = len(self._pending) + self.running
            # Full, or so far behind that the job would finish past its deadline: refuse it now, not later.
            retry_after = max(1, math.ceil(self._service_s * ahead))
            if len(self._pending) >= self.queue_size:
                raise QueueFull(retry_after)
            if self._service_s * (ahead + 1) > job.deadline - time.monotonic():
                raise QueueFull(retry_after, "the server is too busy to answer within the deadline")
            self._pending.append(ticket)
            self._cond.notify()
        return ticket

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
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                ticket = self._current = self._pending.popleft()
            started = time.monotonic()
            try:
                if ticket.expired():
                    ticket.fail(504, "the request passed its deadline while queued")
                    continue
                self._answer(ticket)
                took = time.monotonic() - started  # the pace, from answers that ran to the end
                self._service_s = 0.8 * self._service_s + 0.2 * took if self._service_s else took
            except Cancelled:
                pass
            except Exception as exc:  # a bug, not the client's fault: say so, keep serving
                log.exception("answering failed")
                ticket.fail(500, f"internal error while answering ({type(exc).__name__}); the server goes on")
            finally:
                with self._cond:
                    self._current = None
