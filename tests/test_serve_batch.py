"""The server over the batched engine on SmolLM2: concurrent requests are decoded in the same steps
and answer as they would one at a time; a client that leaves frees its row while the other goes on."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from ragkit.serve import ServeOptions, build_server, create_app
from tests.serve_fixtures import live, sse_events, tiny_pipeline  # noqa: F401 (fixture)

QUESTIONS = ["What lowers the risk of heart attacks in older adults?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def served(tiny_pipeline, tmp_path_factory):
    server = build_server(tiny_pipeline, ServeOptions(queue=8, batch=4, max_tokens=16,
                                                      preferences=tmp_path_factory.mktemp("arena") / "p.jsonl"))
    with live(create_app(server)) as url:
        yield server, url


def _hold_first_start_until_another_waits(server):
    """The first job's retrieval waits until a second job is submitted, so both decode in one
    batch (not a timing guess). Returns the list of submitted jobs, as they arrive."""
    start, submit, submitted = server.service.start, server.scheduler.submit, []

    def counted(job):
        submitted.append(job)
        return submit(job)

    def held(ticket):
        end = time.monotonic() + 30
        while len(submitted) < 2 and time.monotonic() < end:
            time.sleep(0.01)
        server.service.start, server.scheduler.submit = start, submit
        return start(ticket)

    server.service.start, server.scheduler.submit = held, counted
    return submitted


def _alone(pipeline, question: str, chunk_ids: list[str]) -> str:
    """The one-at-a-time answer (the generator's configured 4 tokens, greedy)."""
    chunks = [pipeline.chunk(i) for i in chunk_ids]
    return pipeline.generator.answer(question, chunks, mode="full").text.strip()


def test_concurrent_requests_decode_together_and_answer_as_alone(served, tiny_pipeline):
    server, url = served
    engine = server.service.engine
    _hold_first_start_until_another_waits(server)
    results: dict[int, dict] = {}

    def ask(i: int) -> None:
        results[i] = httpx.post(f"{url}/answer", timeout=120, json={
            "question": QUESTIONS[i], "k": 2, "max_tokens": 4, "mode": "full", "temperature": 0}).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert engine.peak_rows >= 2 and engine.idle and server.scheduler.running == 0
    for i, result in results.items():
        assert result["completion_tokens"] == 4 and result["finish_reason"] == "length"
        assert result["answer"] == _alone(tiny_pipeline, QUESTIONS[i], result["chunk_ids"])


def test_a_client_leaving_frees_its_row_while_the_other_decodes(served, monkeypatch):
    server, url = served
    engine = server.service.engine
    submitted = _hold_first_start_until_another_waits(server)
    steps: list[list[int]] = []  # the engine tickets decoding after each step
    finished: set[int] = set()
    step = engine.step

    def logged_step():
        answers = step()
        steps.append([s.ticket for s in engine.rows])
        finished.update(ticket for ticket, _ in answers)
        return answers

    monkeypatch.setattr(engine, "step", logged_step)
    kept: dict = {}

    def ask() -> None:
        kept["response"] = httpx.post(f"{url}/answer", timeout=120, json={
            "question": QUESTIONS[0], "k": 2, "max_tokens": 16, "mode": "full", "stream": True})

    thread = threading.Thread(target=ask)
    thread.start()
    end = time.monotonic() + 30  # the staying request is submitted first: the leaving one then joins its batch
    while not submitted and time.monotonic() < end:  # (leaving first could be noticed before they share a step)
        time.sleep(0.01)
    with httpx.stream("POST", f"{url}/answer", timeout=120, json={
            "question": QUESTIONS[1], "k": 2, "max_tokens": 16, "mode": "full", "stream": True}) as leaving:
        lines = leaving.iter_lines()
        while next(lines) != "event: token":
            pass
    thread.join(120)
    events = sse_events(kept["response"].text)
    assert events[-1][0] == "done" and events[-1][1]["completion_tokens"] == 16  # the other ran to its budget
    assert engine.idle and server.scheduler.running == 0
    (left,) = {t for tickets in steps for t in tickets} - finished  # never answered: its row was dropped
    (other,) = finished
    after = steps[max(i for i, tickets in enumerate(steps) if sorted(tickets) == sorted([left, other])) + 1:]
    assert [other] in after and all(tickets in ([other], []) for tickets in after)  # the other decoded on alone
