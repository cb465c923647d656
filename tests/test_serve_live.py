"""The server on a real socket: the `openai` client against it, the web page in headless Chromium,
and `ragkit serve` receiving SIGTERM while requests are in flight."""

from __future__ import annotations

import base64
import socket
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from ragkit.serve import ServeOptions, build_server, create_app
from tests.serve_fixtures import free_port, live, sse_events, tiny_pipeline, wait_healthy, write_config  # noqa: F401
from tests.test_report_browser import ARTIFACTS, CHROMIUM_FLAGS, chromium

QUESTION = "What lowers the risk of heart attacks in older adults?"


@pytest.fixture(scope="module")
def served(tiny_pipeline, tmp_path_factory):
    prefs = tmp_path_factory.mktemp("arena") / "prefs.jsonl"
    server = build_server(tiny_pipeline, ServeOptions(queue=8, max_tokens=16, preferences=prefs))
    with live(create_app(server)) as url:
        yield url, prefs


def test_openai_client_stream_and_not(served):
    from openai import OpenAI

    url, _ = served
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    completion = client.chat.completions.create(
        model="serve-tiny", messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": QUESTION}],
        max_tokens=3, temperature=0)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 3 and completion.model == "serve-tiny"
    figures = completion.model_extra["ragkit"]
    assert len(figures["chunk_ids"]) == 2 and figures["mode"] == "blend" and figures["ttft_s"] > 0

    stream = client.chat.completions.create(model="serve-tiny", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=3, stream=True, extra_body={"mode": "full", "k": 1})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and text.strip()
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].model_extra["ragkit"]["mode"] == "full"
    assert sum(1 for c in chunks if c.choices[0].delta.content) >= 2  # really streamed, piece by piece

    raw = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1, "stream": True})
    assert raw.text.rstrip().endswith("data: [DONE]")


class DevTools:
    """Chromium driven over --remote-debugging-pipe (JSON messages ended by NUL on fds 3 and 4)."""

    def __init__(self, binary: str, profile: Path):
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()

        def fds() -> None:
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self.process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                         "--remote-debugging-pipe", "about:blank"], preexec_fn=fds, close_fds=False,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id = b"", 0

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 16)
                assert chunk, "chromium closed its DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)
        os.close(self._write)
        os.close(self._read)


def test_page_in_headless_chromium_streams_an_answer_and_shows_the_arena(served, tmp_path):
    url, prefs = served
    browser = DevTools(chromium(), tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.call("Page.navigate", session, url=f"{url}/?q={quote(QUESTION)}&autorun=1&vote=b")
        rendered, until = "", time.monotonic() + 240
        while not rendered and time.monotonic() < until:
            time.sleep(0.5)
            result = browser.call("Runtime.evaluate", session, returnByValue=True,
                                  expression="document.body ? (document.body.dataset.rendered || '') : ''")
            rendered = result["result"].get("value", "")
        assert rendered, "the page did not finish asking and comparing"
        shot = browser.call("Page.captureScreenshot", session, format="png")["data"]
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "serve-page.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
    state = json.loads(rendered)
    asked = state["ask"]
    assert "error" not in asked and asked["answer"].strip() and asked["tokens"] >= 2  # streamed in pieces
    assert asked["chunks"] == 2 and asked["ttft_s"] > 0 and isinstance(asked["cache_hits"], int)
    assert len(state["arena"]) == 2 and all(answer.strip() for answer in state["arena"])
    assert state["voted"] is True
    vote = json.loads(prefs.read_text().splitlines()[-1])
    assert vote["preference"] == "b" and {vote["system_a"], vote["system_b"]} == {"full", "blend"}
    assert {vote["answer_a"], vote["answer_b"]} == set(state["arena"])


def test_sigterm_under_load_finishes_or_refuses_every_request_and_flushes_the_cache(tmp_path):
    from chunk_cache.store import cache_stats

    config = write_config(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "ragkit.cli", "serve", str(config), "--port", str(port),
                                "--queue", "8", "--batch", "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        wait_healthy(url, 180, process)
        results: dict[int, httpx.Response | Exception] = {}

        def ask(i: int) -> None:
            try:
                results[i] = httpx.post(f"{url}/answer", json={"question": QUESTION, "stream": i % 2 == 0,
                                                               "max_tokens": 12}, timeout=180)
            except httpx.HTTPError as exc:
                results[i] = exc

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
        for thread in threads:
            thread.start()
        deadline, loaded = time.monotonic() + 60, False
        while not loaded and time.monotonic() < deadline:  # under load: two answering together, the others queued
            health = httpx.get(f"{url}/health").json()
            loaded = health["running"] == 2 and health["queue"] >= 2
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        assert loaded, "the server was never seen busy with a queue"
        for thread in threads:
            thread.join(180)
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status says SIGTERM
        assert process.wait(120) in (0, -signal.SIGTERM), process.stderr.read().decode()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
    outcomes = []
    for i in range(5):
        response = results[i]
        assert isinstance(response, httpx.Response), f"request {i} got no answer: {response!r}"
        if i % 2 == 0:
            assert response.status_code == 200
            kind, data = sse_events(response.text)[-1]
            outcomes.append(kind if kind == "done" else data["error"]["code"])
        else:
            outcomes.append("done" if response.status_code == 200 else response.json()["error"]["code"])
    assert "done" in outcomes and set(outcomes) <= {"done", 503}, outcomes
    assert 503 in outcomes, outcomes  # queued requests were told the server is stopping, not left hanging
    stats = cache_stats(tmp_path / "kv")
    assert stats is not None and stats["entries"] > 0


def test_serve_refuses_a_port_in_use_before_loading(tmp_path):
    from typer.testing import CliRunner

    from ragkit.cli import app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(write_config(tmp_path)), "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "indexes").exists()  # refused before loading or indexing anything
