"""The server's routes over the real pipeline (SmolLM2, BM25 over eight documents), through
FastAPI's TestClient: search, answers with their figures, streaming, stop strings, metrics,
and the malformed requests of docs/bad-inputs.md (4xx JSON naming the field, never a 5xx)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from ragkit.serve import ServeOptions, build_server, create_app
from tests.serve_fixtures import sse_events, tiny_pipeline  # noqa: F401 (fixture)

QUESTION = "What lowers the risk of heart attacks in older adults?"


@pytest.fixture(scope="module")
def client(tiny_pipeline, tmp_path_factory):
    prefs = tmp_path_factory.mktemp("arena") / "prefs.jsonl"
    server = build_server(tiny_pipeline, ServeOptions(queue=8, max_k=5, max_tokens=16, preferences=prefs))
    return TestClient(create_app(server), raise_server_exceptions=False)


def test_search_ranks_chunks_with_scores(client):
    chunks = client.post("/search", json={"question": "risk for older adults", "k": 3}).json()["chunks"]
    assert [c["rank"] for c in chunks] == [1, 2, 3]
    assert chunks[0]["doc_id"] == "d1" and "fractures" in chunks[0]["text"]
    assert chunks[0]["score"] >= chunks[1]["score"] >= chunks[2]["score"]


def test_answer_figures_streaming_stop_strings_and_warm_cache(client):
    first = client.post("/answer", json={"question": QUESTION, "k": 2, "max_tokens": 4}).json()
    assert first["mode"] == "blend" and first["finish_reason"] == "length" and first["completion_tokens"] == 4
    assert first["chunk_ids"] == [c["id"] for c in first["chunks"]] and len(first["chunk_ids"]) == 2
    assert first["ttft_s"] >= first["prefill_s"] > 0
    assert 0 <= first["recomputed_tokens"] <= first["context_tokens"]
    words = first["answer"].split()
    assert len(words) >= 3, first["answer"]

    stop = " " + words[2]
    response = client.post("/answer", json={"question": QUESTION, "k": 2, "max_tokens": 4, "stream": True,
                                            "stop": [stop]})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "retrieved" and kinds[-1] == "done" and kinds.count("token") >= 1
    done = events[-1][1]
    assert done["chunk_ids"] == [c["id"] for c in events[0][1]] == first["chunk_ids"]
    streamed = "".join(data["text"] for kind, data in events if kind == "token")
    assert streamed.strip() == done["answer"] == " ".join(words[:2]) and stop not in streamed
    assert done["finish_reason"] == "stop" and done["completion_tokens"] < 4  # its row left at the stop string
    assert done["cache_hits"] == 2  # the first answer's chunk KV stayed warm in the store's memory tier


def test_metrics_exposition(client):
    text = client.get("/metrics").text
    assert 'ragkit_requests_total{route="/answer",status="200"}' in text
    assert 'ragkit_ttft_seconds_bucket{le="+Inf",mode="blend"}' in text
    assert 'ragkit_cache_bytes{tier="host"}' in text and "ragkit_queue_length 0.0" in text
    hit_rate = float(next(line for line in text.splitlines() if line.startswith("ragkit_cache_hit_rate ")).split()[1])
    assert 0.0 < hit_rate <= 1.0


EMOJI_QUESTION = "🦄" * 3000  # 3000 characters, far more tokens than the context leaves with k=5, 16 tokens

# (route, body as bytes or JSON-able, status, field the error names): each row is in docs/bad-inputs.md.
MALFORMED = [
    ("/answer", b"{bad", 400, "body"),
    ("/answer", b"", 422, "body"),
    ("/answer", b"[1, 2]", 422, "body"),
    ("/answer", b"\"a question\"", 422, "body"),
    ("/answer", b'{"question": "\xff\xfe"}', 400, "body"),
    ("/answer", b"[" * 20000 + b"]" * 20000, 400, "body"),
    ("/answer", {}, 422, "question"),
    ("/answer", {"question": 5}, 422, "question"),
    ("/answer", {"question": None}, 422, "question"),
    ("/answer", {"question": "   "}, 422, "question"),
    ("/answer", {"question": "x" * 9000}, 422, "question"),
    ("/answer", {"question": EMOJI_QUESTION, "k": 5, "max_tokens": 16}, 422, "question"),
    ("/answer", {"question": QUESTION, "k": 0}, 422, "k"),
    ("/answer", {"question": QUESTION, "k": 6}, 422, "k"),
    ("/answer", {"question": QUESTION, "k": "3"}, 422, "k"),
    ("/answer", {"question": QUESTION, "k": 2.5}, 422, "k"),
    ("/answer", {"question": QUESTION, "k": 10 ** 30}, 422, "k"),
    ("/answer", {"question": QUESTION, "mode": "magic"}, 422, "mode"),
    ("/answer", {"question": QUESTION, "max_tokens": 0}, 422, "max_tokens"),
    ("/answer", {"question": QUESTION, "max_tokens": 100000}, 422, "max_tokens"),
    ("/answer", {"question": QUESTION, "temperature": -1}, 422, "temperature"),
    ("/answer", b'{"question": "x", "temperature": NaN}', 422, "temperature"),
    ("/answer", {"question": QUESTION, "temperature": "hot"}, 422, "temperature"),
    ("/answer", {"question": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ("/answer", {"question": QUESTION, "stream": "yes"}, 422, "stream"),
    ("/answer", {"question": QUESTION, "cache_dir": "/tmp/elsewhere"}, 422, "cache_dir"),
    ("/answer", {"question": QUESTION, "model": "/models/other"}, 422, "model"),
    ("/answer", {"question": QUESTION, "generator.max_new_tokens": 4096}, 422, "generator.max_new_tokens"),
    ("/answer", {"question": "x" * 70000}, 413, "body"),
    ("/search", {"question": QUESTION, "k": -1}, 422, "k"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}]}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 422, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "n": 2}, 422, "n"),
    ("/answer", {"question": QUESTION, "k": 0}, 422, "k"),  # k = 0 (the messages as the prompt): chats only
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "k": -1}, 422, "k"),
    ("/arena/preference", {"question": QUESTION, "system_a": "gpt", "system_b": "blend", "answer_a": "a",
                           "answer_b": "b", "preference": "a"}, 422, "system_a"),
    ("/arena/preference", {"question": QUESTION, "system_a": "full", "system_b": "blend", "answer_a": "a",
                           "answer_b": "b", "preference": "maybe"}, 422, "preference"),
    ("/arena/preference", {"question": QUESTION, "system_a": "full", "system_b": "blend", "answer_a": "a",
                           "answer_b": "b", "preference": "a", "path": "/etc/passwd"}, 422, "path"),
]


def test_malformed_requests_get_4xx_json_naming_the_field_and_the_server_goes_on(client):
    assert len(MALFORMED) >= 20
    for route, body, status, field in MALFORMED:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = client.post(route, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == status, (route, body if len(raw) < 200 else raw[:40], response.text)
        error = response.json()["error"]
        assert error["param"] == field and error["code"] == status, (route, error)
        assert field == "body" or field in error["message"]
    assert client.get("/answer").status_code == 405 and client.get("/nowhere").json()["error"]["code"] == 404
    answered = client.post("/answer", json={"question": "risk of heart\u0000 attacks?", "k": 1, "max_tokens": 1})
    assert answered.status_code == 200 and answered.json()["completion_tokens"] == 1  # NUL is fine
    assert client.get("/health").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    assert not [line for line in metrics.splitlines() if line.startswith("ragkit_requests_total") and 'status="5' in line]


def test_lone_surrogate_is_refused(client):
    """JSON allows it, the tokenizer cannot encode it (it was a 500)."""
    lone = client.post("/answer", content=b'{"question": "risk of heart attacks \\ud800?"}',
                       headers={"content-type": "application/json"})
    assert lone.status_code == 422 and "surrogate" in lone.json()["error"]["message"]
