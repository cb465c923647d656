"""The OpenAI-compatible endpoint client: retries, backoff, one clear line on failure, and eval runs through it
(query expansion, listwise reranking) against a stub server on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from generators.endpoint import EndpointLLM
from generators.llm import CachedLLM
from ragkit.bench.serve import free_port
from ragkit.cli import app
from ragkit.errors import EndpointError
from tests.llm_stub import StubState, stub_endpoint
from tests.test_pipeline import make_beir, make_config

runner = CliRunner()
MESSAGES = [{"role": "user", "content": "hello"}]


def test_a_reply_and_what_was_sent(monkeypatch):
    monkeypatch.setenv("RAGKIT_TEST_KEY", "sk-test")
    state = StubState(reply="hi there")
    with stub_endpoint(state) as url:
        llm = EndpointLLM(url, model="m", api_key_env="RAGKIT_TEST_KEY", retries=0)
        assert llm.complete(MESSAGES, 7) == "hi there"
    assert state.requests == [{"messages": MESSAGES, "max_tokens": 7, "temperature": 0.0, "stream": False,
                               "model": "m"}]


def test_a_failing_request_is_retried():
    state = StubState(behaviour="flaky", reply="ok")  # every other request is a 503
    with stub_endpoint(state) as url:
        llm = EndpointLLM(url, retries=2)
        assert llm.complete(MESSAGES, 4) == "ok"
    assert llm.requests == 2


@pytest.mark.parametrize("behaviour, says", [("500", "HTTP 500"), ("malformed", "not a chat completion"),
                                             ("hang", "no reply within 0.3s")])
def test_failures_after_every_retry_raise_one_error_naming_the_url(behaviour, says):
    state = StubState(behaviour=behaviour, hang_s=1.5)
    with stub_endpoint(state) as url:
        llm = EndpointLLM(url, retries=1, timeout=0.3)
        with pytest.raises(EndpointError) as info:
            llm.complete(MESSAGES, 4)
    message = str(info.value)
    assert url in message and "failed after 2 attempts" in message and says in message
    assert len(state.requests) == 2


def test_an_endpoint_that_is_down():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointError, match="cannot connect"):
        EndpointLLM(url, retries=1, timeout=1).complete(MESSAGES, 4)


def test_complete_many_keeps_order_and_the_cache_answers_a_rerun(tmp_path):
    state = StubState(reply="same")
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    with stub_endpoint(state) as url:
        llm = CachedLLM(EndpointLLM(url, concurrency=3, retries=0), tmp_path)
        assert llm.complete_many(prompts, 4) == ["same"] * 6
        again = CachedLLM(EndpointLLM(url, retries=0), tmp_path)
        assert again.complete_many(prompts, 4) == ["same"] * 6
    assert (llm.calls, llm.hits, again.calls, again.hits) == (6, 0, 0, 6)
    assert sorted(r["messages"][0]["content"] for r in state.requests) == [f"q{i}" for i in range(6)]


QUERIES = [("q1", "risk older adults"), ("q2", "lower risk"), ("q3", "adults")]  # several hits each


def _endpoint_config(tmp_path, url, extra):
    make_beir(tmp_path / "data", queries=QUERIES)
    return make_config(tmp_path, f"""
[llm]
backend = "openai"
base_url = "{url}"
retries = 1
timeout = 0.5
cache_dir = "{tmp_path / 'llm'}"
{extra}
""")


@pytest.mark.parametrize("behaviour", ["down", "500", "hang", "malformed"])
def test_eval_through_a_failing_endpoint_exits_2_with_one_line_and_no_run(tmp_path, behaviour):
    state = StubState(behaviour=behaviour, hang_s=1.5)
    with stub_endpoint(state) as url:
        if behaviour == "down":
            url = f"http://127.0.0.1:{free_port()}/v1"
        config = _endpoint_config(tmp_path, url, '[query]\nexpansion = "hyde"')
        result = runner.invoke(app, ["eval", str(config), "--quiet", "--no-answers"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and url in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "tiny").exists()


def test_eval_listwise_through_an_endpoint_repairs_a_reply_that_is_not_a_permutation(tmp_path):
    state = StubState(reply="[2] > [2] > [7]")  # a duplicate and an unknown identifier
    with stub_endpoint(state) as url:
        config = _endpoint_config(tmp_path, url, '[rerank]\nstages = [{ type = "llm-listwise", depth = 3 }]')
        result = runner.invoke(app, ["eval", str(config), "--quiet", "--no-answers"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert results["counts"]["llm_calls"] == len(state.requests) == 3  # one window per query
    final, first = (_ranking(tmp_path / "runs" / "tiny" / name) for name in ("run.trec", "run.first_stage.trec"))
    for qid, docs in first.items():
        assert len(docs) >= 3
        assert final[qid] == [docs[1], docs[0]] + docs[2:]  # "[2]" first, the others in their previous order


def _ranking(path):
    ranking = {}
    for line in path.read_text().splitlines():
        qid, _, doc_id, *_ = line.split()
        ranking.setdefault(qid, []).append(doc_id)
    return ranking
