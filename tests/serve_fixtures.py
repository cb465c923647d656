"""A tiny corpus and config for the server tests, and a live uvicorn running in a thread."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn

from ragkit.bench.serve import free_port, wait_healthy
from tests.test_pipeline import DOCS as PIPELINE_DOCS

torch.set_num_threads(1)  # two shared cores: one thread per process runs faster than two fighting

DOCS = PIPELINE_DOCS + [
    ("d7", "Paris", "Paris is the capital of France and lies on the river Seine."),
    ("d8", "Everest", "Mount Everest is the highest mountain above sea level, in the Himalayas."),
]


def write_config(folder: Path, max_new_tokens: int = 4) -> Path:
    """A JSONL corpus of eight short documents, BM25, SmolLM2 answering from 2 chunks."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for doc_id, title, text in DOCS:
            fh.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    config = folder / "serve.toml"
    config.write_text(f"""
name = "serve-tiny"
[dataset]
format = "jsonl"
path = "data"
[chunking]
size = 64
overlap = 8
[retrieval]
index_dir = "{folder / 'indexes'}"
retrievers = [{{ type = "bm25" }}]
[generator]
model = "smollm2"
max_new_tokens = {max_new_tokens}
chunks = 2
[cache]
mode = "blend"
dir = "{folder / 'kv'}"
[eval]
runs_dir = "{folder / 'runs'}"
""")
    return config


@contextmanager
def live(app):
    """Run an ASGI app on 127.0.0.1 in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 30)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


class GatedEngine:
    """A model-free engine with one batch row: a request's steps give no token until `gate` opens,
    then one token each until it has `tokens` (an answer taking `work_s` in all)."""

    max_batch = 1

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.work_s = 0.0
        self.gate = threading.Event()
        self.rows: dict[int, tuple[list[str], object]] = {}  # ticket -> (pieces so far, on_token)
        self._tickets = 0

    @property
    def idle(self) -> bool:
        return not self.rows

    def submit(self, on_token) -> int:
        self._tickets += 1
        self.rows[self._tickets] = ([], on_token)
        return self._tickets

    def cancel(self, ticket: int) -> bool:
        return self.rows.pop(ticket, None) is not None

    def stop(self, ticket: int) -> None:
        del self.rows[ticket]

    def step(self) -> list:
        if not self.gate.wait(0.02):
            return []
        time.sleep(self.work_s / self.tokens)
        finished = []
        for ticket, (pieces, on_token) in list(self.rows.items()):
            pieces.append(f"t{len(pieces)} ")
            on_token(pieces[-1])
            if len(pieces) == self.tokens:
                del self.rows[ticket]
                finished.append((ticket, None))
        return finished


class SerialBatchEngine(GatedEngine):
    """Four rows, but each step works on the oldest row only (as prefills admitted together run one
    after another): a lone job's time in the batch says nothing of the jobs queued before a new one."""

    max_batch = 4

    def step(self) -> list:
        if not self.gate.wait(0.02) or not self.rows:
            return []
        time.sleep(self.work_s / self.tokens)
        ticket, (pieces, on_token) = next(iter(self.rows.items()))
        pieces.append(f"t{len(pieces)} ")
        on_token(pieces[-1])
        if len(pieces) < self.tokens:
            return []
        del self.rows[ticket]
        return [(ticket, None)]


class GatedService:
    """The service side of the server without a model, for queue, deadline and disconnect tests:
    each answer emits `tokens` pieces, its first one once the test opens `gate`."""

    name, model = "gated", "none"

    def __init__(self, tokens: int = 3, engine: type[GatedEngine] = GatedEngine):
        self.engine = engine(tokens)
        self.gate = self.engine.gate
        self.started: list[str] = []
        self.finished: list[str] = []
        self.flushed = 0

    @property
    def work_s(self) -> float:
        return self.engine.work_s

    @work_s.setter
    def work_s(self, seconds: float) -> None:
        self.engine.work_s = seconds

    def question_room(self, k: int, max_tokens: int) -> int:
        return 1000

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def search(self, question: str, k: int) -> list[dict]:
        return [{"id": f"c{i}", "doc_id": f"d{i}", "rank": i + 1, "score": 1.0 / (i + 1), "title": "", "text": "t"}
                for i in range(k)]

    def start(self, ticket):
        from ragkit.serve.scheduler import Started

        job = ticket.job
        self.started.append(job.question)
        ticket.emit("retrieved", self.search(job.question, job.k))

        def finish(_answer) -> None:
            self.finished.append(job.question)
            ticket.emit("done", {"answer": "t0 t1 t2", "chunk_ids": [f"c{i}" for i in range(job.k)],
                                 "mode": job.mode, "ttft_s": 0.01, "prefill_s": 0.01, "total_s": 0.02,
                                 "cache_hits": 1, "context_tokens": 10, "recomputed_tokens": 2,
                                 "completion_tokens": self.engine.tokens, "finish_reason": "length"})

        return Started(lambda piece: ticket.emit("token", piece), finish)

    def cache_stats(self) -> dict:
        return {"hit_rate": 0.5, "tiers": {"host": 123}}

    def flush(self) -> None:
        self.flushed += 1


def gated_server(tmp_path: Path, queue: int = 2, deadline_s: float = 30.0, api_key: str | None = None,
                 engine: type[GatedEngine] = GatedEngine):
    from ragkit.serve.app import Server
    from ragkit.serve.arena import PreferenceLog
    from ragkit.serve.metrics import ServeMetrics
    from ragkit.serve.scheduler import EngineScheduler
    from ragkit.serve.schemas import Limits

    service = GatedService(engine=engine)
    limits = Limits(modes=("full", "blend"), default_mode="blend", default_k=2, max_k=5, default_max_tokens=3,
                    max_tokens=8, deadline_s=deadline_s)
    return Server(service=service, scheduler=EngineScheduler(service, queue), limits=limits,
                  api_key=api_key, arena=PreferenceLog(tmp_path / "prefs.jsonl", ("full", "blend"), "gated"),
                  metrics=ServeMetrics(), drain_timeout_s=5)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """One Pipeline (SmolLM2 and a BM25 index over DOCS) shared by the server tests: each test module
    builds its own Server around it, as `ragkit serve` does once per process."""
    from ragkit.pipeline import Pipeline

    return Pipeline.from_config(write_config(tmp_path_factory.mktemp("serve")), progress=False)


def sse_events(text: str) -> list[tuple[str, object]]:
    """(event, parsed data) per server-sent event of a response body."""
    events = []
    for block in text.strip().split("\n\n"):
        kind, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
        events.append((kind, data if data == "[DONE]" else json.loads(data)))
    return events
