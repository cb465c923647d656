"""Disk writes of a KV store off the caller's thread: one writer thread behind a bounded queue.

Encoding an entry (safetensors), hashing it (xxh3 + sha256) and fsyncing it costs about as much as
reading the chunk once more; none of that should sit between a question and its answer. `KVStore`
holds a new entry in its memory tiers at once (the next prompt finds it there) and hands the disk write
to a `DiskWriter`:

    submit(digest, job, nbytes) -> ticket   queue a write; waits while more than `max_bytes` are queued
    wait(ticket)                            return once that write (and every earlier one) is on disk
    pending(digest)                         the entry of a queued write, for a lookup that misses memory

The contract a caller relies on: once `wait(ticket)` returns, the entry survives a SIGKILL of the
process (the disk tier publishes by temp file + fsync + rename). The batched engine waits for a
request's own writes before it reports that request answered, so an answer returned to anyone means
its chunks are stored; the writes themselves run while the request decodes. At interpreter exit every
writer drains its queue.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from typing import Any, Callable

log = logging.getLogger("ragkit.chunk_cache")

_WRITERS: "weakref.WeakSet[DiskWriter]" = weakref.WeakSet()


class DiskWriter:
    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._queue: deque[tuple[int, str, Callable[[], None], int, Any]] = deque()
        self._queued_bytes = 0
        self._submitted = self._done = 0  # tickets: writes are numbered 1, 2, ... in submission order
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kv-disk-writer", daemon=True)
        self._thread.start()
        _WRITERS.add(self)

    def submit(self, digest: str, job: Callable[[], None], nbytes: int, entry: Any = None) -> int:
        """Queue `job` (the write of `entry` under `digest`); returns its ticket. A job over the byte bound
        waits until the queue has drained below it (memory stays bounded; one larger entry still goes)."""
        with self._cond:
            while self._queued_bytes and self._queued_bytes + nbytes > self.max_bytes:
                self._cond.wait()
            self._submitted += 1
            self._queue.append((self._submitted, digest, job, nbytes, entry))
            self._queued_bytes += nbytes
            self._cond.notify_all()
            return self._submitted

    @property
    def last_ticket(self) -> int:
        return self._submitted

    def pending(self, digest: str) -> Any:
        """The entry of a queued (not yet written) job under `digest`, or None."""
        with self._cond:
            for _, queued, _, _, entry in reversed(self._queue):
                if queued == digest:
                    return entry
        return None

    def wait(self, ticket: int | None = None) -> None:
        """Block until write `ticket` (default: every write submitted so far) is done."""
        with self._cond:
            target = self._submitted if ticket is None else ticket
            while self._done < target:
                self._cond.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                ticket, _digest, job, nbytes, _entry = self._queue[0]
            try:
                job()
            except Exception:  # a lost write costs a recomputation, never the process
                log.exception("writing a KV entry to disk failed")
            with self._cond:
                self._queue.popleft()
                self._queued_bytes -= nbytes
                self._done = ticket
                self._cond.notify_all()


@atexit.register
def _drain_all() -> None:
    for writer in list(_WRITERS):
        writer.wait()
