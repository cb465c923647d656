"""`ragkit eval` with answers, `ragkit cache warm --queries`, and their bad inputs, on a tiny corpus.

SmolLM2-135M answers each 2-chunk prompt of a few dozen tokens in about a second here; answers
are cut at 4 new tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eval.answers import exact_match, token_f1
from eval.report import discover_runs, quality_points, write_report
from ragkit.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.slow  # loads SmolLM2 and answers with it

DOCS = {
    "paris": "Paris is the capital of France. The Eiffel Tower stands in Paris.",
    "rome": "Rome is the capital of Italy. The Colosseum stands in Rome.",
    "berlin": "Berlin is the capital of Germany. The Brandenburg Gate stands in Berlin.",
    "nile": "The Nile is the longest river in Africa and flows into the Mediterranean Sea.",
}
QUERIES = [
    {"_id": "q1", "text": "What is the capital of France?", "answers": ["Paris"]},
    {"_id": "q2", "text": "What is the capital of Italy?", "metadata": {"answers": "Rome"}},
    {"_id": "q3", "text": "Where does the Nile flow?"},  # no gold answer: retrieval only
]
QRELS = {"q1": "paris", "q2": "rome", "q3": "nile"}


def write_dataset(folder: Path, queries=QUERIES) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n"
                                                 for d, t in DOCS.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q['_id']}\t{QRELS[q['_id']]}\t1\n" for q in queries))
    return folder


def write_config(root: Path, data: Path, mode: str = "blend", generator: str | None = '"smollm2"',
                 name: str = "tiny-rag") -> Path:
    generator_section = "" if generator is None else f"""
[generator]
model = {generator}
max_new_tokens = 4
chunks = 2
"""
    config = root / f"{name}.toml"
    config.write_text(f"""name = "{name}"
[dataset]
format = "beir"
path = "{data}"
[chunking]
size = 48
overlap = 8
[retrieval]
k = 10
index_dir = "{root / 'indexes' / name}"
{generator_section}
[cache]
mode = "{mode}"
dir = "{root / 'kv'}"
[eval]
metrics = ["ndcg@10", "recall@10"]
runs_dir = "{root / 'runs'}"
""")
    return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("answers")
    return root, write_dataset(root / "data")


def _answers(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "answers.jsonl").read_text().splitlines()]


def test_eval_scores_answers_beside_retrieval_against_full(tiny):
    root, data = tiny
    config = write_config(root, data, mode="full", name="tiny-full")
    result = runner.invoke(app, ["eval", str(config), "--reference", "full", "--json", "-q"])
    assert result.exit_code == 0, result.output
    results = json.loads(result.output[result.output.index("{"):])
    aggregate, per_query = results["aggregate"], results["per_query"]
    for key in ("ndcg@10", "em", "f1", "ttft_p50_s", "ttft_p90_s", "recompute_share", "chunk_hit_rate",
                "agreement", "kl", "full_f1", "full_ttft_p50_s"):
        assert key in aggregate, key
    assert results["timings"]["questions_per_s"] > 0
    assert results["counts"]["answered_queries"] == 3 and results["counts"]["queries_without_gold_answers"] == 1
    # full against itself: the same tokens and the same first-token distribution, nothing reused
    assert aggregate["agreement"] == 1.0 and aggregate["kl"] < 1e-6
    assert aggregate["chunk_hit_rate"] == 0.0 and aggregate["recompute_share"] == 1.0

    answers = _answers(Path(results["run_dir"]))
    assert [a["query_id"] for a in answers] == ["q1", "q2", "q3"]
    assert answers[1]["golds"] == ["Rome"] and answers[2]["golds"] == []  # metadata.answers as a string
    for a in answers:
        assert 1 <= len(a["chunk_ids"]) <= 2 and a["cache_hits"] == 0 and a["ttft_s"] > 0
        assert a["reference_answer"] == a["answer"]
        if a["golds"]:  # scored from what answers.jsonl holds, best over golds
            assert per_query[a["query_id"]]["f1"] == pytest.approx(token_f1(a["answer"], a["golds"]))
            assert per_query[a["query_id"]]["em"] == exact_match(a["answer"], a["golds"])
        else:
            assert "f1" not in per_query[a["query_id"]] and "ndcg@10" in per_query[a["query_id"]]
    assert aggregate["f1"] == pytest.approx((per_query["q1"]["f1"] + per_query["q2"]["f1"]) / 2)

    # the leaderboard plots the run and its reference, and compare pairs answer metrics over queries
    entries, _ = discover_runs(root / "runs")
    assert {(p[1], p[2]) for p in quality_points(entries)} == {("full", "agreement")}
    report = write_report(root / "runs", root / "report")
    page = Path(report["html"]).read_text()
    assert "TTFT p50 (s)" in page and "Questions/s" in page and "no run with generated answers" not in page
    compared = runner.invoke(app, ["compare", results["run_dir"], results["run_dir"], "-m", "f1", "--samples",
                                   "200"])
    assert compared.exit_code == 0, compared.output
    assert "f1" in compared.output and " 2 " in compared.output  # two queries with gold answers paired


def test_cache_warm_from_a_query_log_then_eval_reports_the_hits(tiny):
    root, data = tiny
    config = write_config(root, data, mode="blend", name="tiny-blend")
    log = root / "log.txt"
    log.write_text("What is the capital of France?\n\nWhat is the capital of Italy?\n")
    warmed = runner.invoke(app, ["cache", "warm", str(config), "--queries", str(log), "-q"])
    assert warmed.exit_code == 0, warmed.output
    assert "for 2 queries" in warmed.output
    result = runner.invoke(app, ["eval", str(config), "-q", "--json"])
    assert result.exit_code == 0, result.output
    results = json.loads(result.output[result.output.index("{"):])
    answers = {a["query_id"]: a for a in _answers(Path(results["run_dir"]))}
    # q1 and q2 retrieve what the log retrieved: every chunk found; q3 (the Nile) was not in the log
    assert answers["q1"]["cache_hits"] == 2 and answers["q2"]["cache_hits"] == 2
    assert results["per_query"]["q1"]["chunk_hit_rate"] == 1.0
    assert results["cache_mode"] == "blend" and 0 < results["aggregate"]["chunk_hit_rate"] <= 1
    by_split = runner.invoke(app, ["cache", "warm", str(config), "--queries", "test", "--top", "1", "-q"])
    assert by_split.exit_code == 0 and "for 3 queries of test" in by_split.output, by_split.output
    unknown = runner.invoke(app, ["cache", "warm", str(config), "--queries", "nosuchsplit"])
    assert unknown.exit_code == 2 and "neither a query-log file nor a split" in unknown.output


def test_answers_without_gold_answers_are_refused(tiny, tmp_path):
    _root, _ = tiny
    data = write_dataset(tmp_path / "data", [{k: v for k, v in q.items() if k not in ("answers", "metadata")}
                                             for q in QUERIES])
    config = write_config(tmp_path, data, generator=None, name="no-golds")
    result = runner.invoke(app, ["eval", str(config), "--answers", "-q"])
    assert result.exit_code == 2
    assert "none of the 3 queries has gold answers" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs" / "no-golds").exists()
    plain = runner.invoke(app, ["eval", str(config), "-q"])  # without a [generator]: retrieval only
    assert plain.exit_code == 0 and not (tmp_path / "runs" / "no-golds" / "answers.jsonl").exists()


def test_missing_model_folder_and_unknown_metric_are_one_message(tiny, tmp_path):
    _root, data = tiny
    config = write_config(tmp_path, data, generator=f'"{tmp_path / "no-such-model"}"', name="no-model")
    result = runner.invoke(app, ["eval", str(config), "-q"])
    assert result.exit_code == 2 and "generator.model" in result.output and "no-such-model" in result.output
    assert len(result.output.strip().splitlines()) == 1
    config = write_config(tmp_path, data, name="bad-metric")
    result = runner.invoke(app, ["eval", str(config), "-q", "--set", "eval.answer_metrics=em,bleu"])
    assert result.exit_code == 2 and "bleu" in result.output
    assert not (tmp_path / "runs").exists()


def test_question_longer_than_the_model_context_names_the_query(tmp_path):
    long_question = {"_id": "q-long", "text": "capital " * 9000, "answers": ["Paris"]}
    data = write_dataset(tmp_path / "data", [QUERIES[0], long_question | {"_id": "q2"}])
    config = write_config(tmp_path, data, name="too-long")
    result = runner.invoke(app, ["eval", str(config), "-q"])
    assert result.exit_code == 2, result.output
    assert "query 'q2'" in result.output and "max_position_embeddings" in result.output
    assert not (tmp_path / "runs").exists()


def test_answer_run_killed_midway_leaves_no_run_folder(tiny, tmp_path):
    _root, data = tiny
    config = write_config(tmp_path, data, mode="full", name="killed")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "ragkit.cli", "eval", str(config), "--reference", "full"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    deadline = time.monotonic() + 120
    while b"answering" not in seen and time.monotonic() < deadline:
        seen += os.read(child.stderr.fileno(), 4096) or b""
        if child.poll() is not None:
            break
    assert b"answering" in seen, seen.decode(errors="replace")[-2000:]
    time.sleep(1.0)  # inside the answer loop
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    runs = tmp_path / "runs"
    assert not (runs / "killed").exists()
    leftovers = [p for p in runs.iterdir() if not p.name.endswith(".lock")] if runs.exists() else []
    assert all(p.name.startswith(".") for p in leftovers)  # hidden temp folders only, never read as runs
