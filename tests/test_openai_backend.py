"""generator.backend = "openai" against a live `ragkit serve` (same model, full prefill): the RAG prompts go
whole to the endpoint as chat messages, and the greedy answers equal the local full-mode answers at the
config's own settings (5 chunks, 16 tokens). The server tokenises the rendered chat whole; the local
pieces concatenate to the same ids (tests/test_prompt.py), so only batching numerics may part them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.cli import app
from tests.serve_fixtures import live

pytestmark = pytest.mark.slow
runner = CliRunner()
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "musique-rag.toml"
QUESTIONS = 10


def _overrides(tmp_path: Path) -> list[str]:
    return [f"retrieval.index_dir={tmp_path / 'index'}", f"cache.dir={tmp_path / 'kv'}", "cache.mode=full",
            f"eval.runs_dir={tmp_path / 'runs'}", f"dataset.limit_queries={QUESTIONS}"]


def _answers(tmp_path: Path) -> dict[str, dict]:
    path = tmp_path / "runs" / "musique-rag" / "answers.jsonl"
    return {r["query_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_openai_backend_on_ragkit_serve_answers_as_local_full_prefill(tmp_path):
    from ragkit.config import load_config, parse_overrides
    from ragkit.pipeline import Pipeline
    from ragkit.serve import ServeOptions, build_server
    from ragkit.serve.app import create_app

    sets = [arg for pair in _overrides(tmp_path) for arg in ("--set", pair)]
    local = runner.invoke(app, ["eval", str(CONFIG), "--quiet", *sets])
    assert local.exit_code == 0, local.output
    local_answers = _answers(tmp_path)
    assert len(local_answers) == QUESTIONS

    pipe = Pipeline(load_config(CONFIG, parse_overrides(_overrides(tmp_path))), progress=False)
    server = build_server(pipe, ServeOptions(modes=("full", "blend"), extra={"max_question_chars": 64000}))
    with live(create_app(server)) as url:
        remote = runner.invoke(app, ["eval", str(CONFIG), "--quiet", *sets, "--set", "generator.backend=openai",
                                     "--set", f"llm.base_url={url}/v1", "--set", "llm.timeout=600",
                                     "--set", "llm.concurrency=1"])
    assert remote.exit_code == 0, remote.output
    remote_answers = _answers(tmp_path)
    results = json.loads((tmp_path / "runs" / "musique-rag" / "results.json").read_text())
    assert results["cache_mode"] == "openai-full-prompt"
    assert results["counts"]["endpoint_requests"] == QUESTIONS
    same = [qid for qid, r in local_answers.items() if remote_answers[qid]["answer"] == r["answer"]]
    assert all(r["mode"] == "openai-full-prompt" for r in remote_answers.values())
    assert all(remote_answers[q]["chunk_ids"] == local_answers[q]["chunk_ids"] for q in local_answers)
    assert len(same) >= 8, [(local_answers[q]["answer"], remote_answers[q]["answer"]) for q in local_answers]
