"""Queue, deadline, disconnect, drain and access rules, with a model-free service whose answers
wait at a gate the test opens (so that "busy" is a state the test controls, not a timing guess)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from ragkit.serve import create_app
from tests.serve_fixtures import GatedEngine, SerialBatchEngine, gated_server, live, sse_events


def _until(condition, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def _post_in_thread(url: str, body: dict, results: list, **kwargs) -> threading.Thread:
    def run():
        results.append(httpx.post(url, json=body, timeout=30, **kwargs))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_full_queue_answers_429_with_retry_after(tmp_path):
    server = gated_server(tmp_path, queue=2)
    with live(create_app(server)) as url:
        results: list = []
        threads = [_post_in_thread(f"{url}/answer", {"question": f"q{i}"}, results) for i in range(3)]
        _until(lambda: server.scheduler.running == 1 and server.scheduler.queue_length == 2)
        refused = httpx.post(f"{url}/answer", json={"question": "one too many"})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        server.service.gate.set()
        for thread in threads:
            thread.join(10)
        assert sorted(r.status_code for r in results) == [200, 200, 200]
        assert httpx.post(f"{url}/answer", json={"question": "later"}).status_code == 200


@pytest.mark.parametrize("engine, most_answered", [(GatedEngine, 20), (SerialBatchEngine, 8)])
def test_overload_gets_answers_or_429_not_timeouts(tmp_path, engine, most_answered):
    """Once the pace is known, a request that would finish past its deadline is refused at once. One job
    alone takes 0.25 s; with SerialBatchEngine (rows worked one after another) 20 at once would have
    passed as 5 batches x 0.25 s, but the jobs ahead (x 0.25 s each) bound what still fits in 2 s."""
    server = gated_server(tmp_path, queue=50, deadline_s=2.0, engine=engine)
    server.service.gate.set()
    server.service.work_s = 0.25
    with live(create_app(server)) as url:
        assert httpx.post(f"{url}/answer", json={"question": "pace"}).status_code == 200
        results: list = []
        threads = [_post_in_thread(f"{url}/answer", {"question": f"q{i}"}, results) for i in range(20)]
        for thread in threads:
            thread.join(30)
    codes = [r.status_code for r in results]
    assert len(codes) == 20 and set(codes) == {200, 429}, codes  # no 504: nobody waited in vain
    assert 3 <= codes.count(200) <= most_answered


def test_deadline_cancels_the_request_and_frees_its_slot(tmp_path):
    server = gated_server(tmp_path, queue=2, deadline_s=0.5)
    client = TestClient(create_app(server))
    response = client.post("/answer", json={"question": "slow"})
    assert response.status_code == 504 and "deadline" in response.json()["error"]["message"]
    _until(lambda: server.scheduler.running == 0)  # the worker noticed at its next check and let go
    assert server.service.finished == []
    server.service.gate.set()
    assert client.post("/answer", json={"question": "fast"}).json()["answer"] == "t0 t1 t2"


def test_client_disconnect_mid_stream_frees_the_slot(tmp_path):
    server = gated_server(tmp_path, queue=2)
    with live(create_app(server)) as url:
        with httpx.stream("POST", f"{url}/answer", json={"question": "leaving", "stream": True}) as response:
            first = next(response.iter_lines())
            assert first == "event: retrieved"
        _until(lambda: server.scheduler.running == 0)  # gone before its first token: slot freed
        assert server.service.finished == []
        # a queued request whose client leaves gives its place back too
        with httpx.stream("POST", f"{url}/answer", json={"question": "running", "stream": True}) as running:
            lines = running.iter_lines()
            next(lines)
            try:
                httpx.post(f"{url}/answer", json={"question": "queued"}, timeout=0.5)
            except httpx.ReadTimeout:
                pass
            _until(lambda: server.scheduler.queue_length == 0)
            server.service.gate.set()
            events = sse_events("\n".join(lines))
        assert events[-1][0] == "done" and "queued" not in server.service.started


def test_drain_lets_running_finish_and_ends_queued_with_503(tmp_path):
    server = gated_server(tmp_path, queue=4)
    with live(create_app(server)) as url:
        results: list = []
        threads = [_post_in_thread(f"{url}/answer", {"question": q, "stream": True}, results)
                   for q in ("first", "second")]
        _until(lambda: server.scheduler.running == 1 and server.scheduler.queue_length == 1)
        server.scheduler.drain()  # what SIGTERM does first
        refused = httpx.post(f"{url}/answer", json={"question": "new"})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_shutting_down"
        server.service.gate.set()
        for thread in threads:
            thread.join(10)
        outcomes = sorted(sse_events(r.text)[-1][0] for r in results)
        assert outcomes == ["done", "error"]
        error = next(data for r in results for kind, data in sse_events(r.text) if kind == "error")
        assert error["error"]["code"] == 503 and "shutting down" in error["error"]["message"]


def test_api_key_on_every_route_but_health(tmp_path):
    server = gated_server(tmp_path, api_key="s3cret")
    server.service.gate.set()
    client = TestClient(create_app(server))
    assert client.get("/health").status_code == 200
    for method, path in [("get", "/"), ("get", "/info"), ("get", "/metrics"), ("post", "/search"),
                         ("post", "/answer"), ("post", "/v1/chat/completions"), ("get", "/v1/models"),
                         ("post", "/arena/preference")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cre"}):
            response = getattr(client, method)(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["type"] == "authentication_error"
    good = {"Authorization": "Bearer s3cret"}
    assert client.post("/answer", json={"question": "q"}, headers=good).status_code == 200
    assert client.post("/answer", json={"question": "q"}, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/?api_key=s3cret").status_code == 200  # the page, opened in a browser
    assert client.get("/info?api_key=s3cret").status_code == 401  # only the page takes it in the URL


def test_arena_votes_go_to_the_operators_file(tmp_path):
    server = gated_server(tmp_path)
    client = TestClient(create_app(server))
    vote = {"question": "which?", "system_a": "blend", "system_b": "full", "answer_a": "x", "answer_b": "y",
            "preference": "b"}
    assert client.post("/arena/preference", json=vote).json() == {"recorded": True, "preference": "b"}
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["preference"] == "b" and rows[0]["system_b"] == "full"
    refused = client.post("/arena/preference", json={**vote, "file": str(tmp_path / "elsewhere.jsonl")})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "file"
    assert not (tmp_path / "elsewhere.jsonl").exists()


@pytest.mark.parametrize("mode", ["full", "blend"])
def test_a_request_chooses_among_the_allowed_modes_only(tmp_path, mode):
    server = gated_server(tmp_path)
    server.service.gate.set()
    client = TestClient(create_app(server))
    assert client.post("/answer", json={"question": "q", "mode": mode}).json()["mode"] == mode
    refused = client.post("/answer", json={"question": "q", "mode": "craft"})  # a real mode, not allowed here
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "mode"
