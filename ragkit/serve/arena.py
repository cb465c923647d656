"""Pairwise judgements from the arena view (Ragnarök-style): one JSON line per vote.

The file is chosen by the server's operator (`ragkit serve --preferences`), never by a request.
Each vote is one `write` of one line to a file opened for appending, under a lock, then fsync:
a crash loses at most the vote being written, and a reader never sees half a line from this process.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from ragkit.serve.schemas import FieldError, Limits, PreferenceRequest


class PreferenceLog:
    def __init__(self, path: Path, systems: tuple[str, str], server: str):
        self.path, self.systems, self.server = Path(path), systems, server
        self._lock = threading.Lock()

    def record(self, vote: PreferenceRequest, limits: Limits) -> dict:
        question = limits.question(vote.question)
        for field in ("system_a", "system_b"):
            if getattr(vote, field) not in self.systems:
                raise FieldError(field, f"not an arena system of this server; allowed: {', '.join(self.systems)}")
        for field in ("answer_a", "answer_b"):
            if len(getattr(vote, field)) > limits.max_output_chars:
                raise FieldError(field, f"longer than the server's answers ({limits.max_output_chars} characters)")
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "server": self.server, "question": question,
               "system_a": vote.system_a, "system_b": vote.system_b, "answer_a": vote.answer_a,
               "answer_b": vote.answer_b, "preference": vote.preference}
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return row
