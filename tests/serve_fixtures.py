"""A tiny corpus and config for the server tests, and a live uvicorn running in a thread."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

DOCS = [
    ("d1", "Vitamin D", "Vitamin D supplements reduce the risk of bone fractures in older adults."),
    ("d2", "Statins", "Statins lower cholesterol and the risk of heart attacks."),
    ("d3", "Sleep", "Short sleep is linked to obesity in children and adults."),
    ("d4", "Coffee", "Coffee consumption is associated with lower liver disease mortality."),
    ("d5", "Aspirin", "Daily aspirin reduces colorectal cancer incidence over long follow-up."),
    ("d6", "Exercise", "Aerobic exercise improves memory in older adults with mild impairment."),
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def wait_healthy(url: str, timeout_s: float, process=None) -> None:
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy in {timeout_s} s")
