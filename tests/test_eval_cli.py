"""`ragkit score`, `ragkit compare` and `ragkit report` as a user runs them, bad input included."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from eval.runs import read_run
from ragkit.cli import app
from tests.eval_fixtures import DATA, scifact_bm25_run, write_scored_run, write_synthetic_runs

runner = CliRunner()


@pytest.fixture(scope="module")
def scifact_runs(tmp_path_factory):
    """Two SciFact BM25 runs: Lucene k1 0.9 b 0.4 with stemming, and k1 1.5 b 0.75 without."""
    root = tmp_path_factory.mktemp("runs")
    tuned = write_scored_run(root / "bm25-tuned", "bm25-tuned", *scifact_bm25_run())
    plain = write_scored_run(root / "bm25-plain", "bm25-plain", *scifact_bm25_run(k1=1.5, b=0.75, stem=False))
    return root, tuned, plain


@pytest.mark.slow
def test_compare_prints_difference_and_p_values(scifact_runs):
    root, tuned, plain = scifact_runs
    result = runner.invoke(app, ["compare", str(root / "bm25-tuned"), str(root / "bm25-plain"),
                                 "--metric", "ndcg@10", "--metric", "recall@100", "--samples", "2000"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line.split() for line in result.output.splitlines() if line.startswith("scifact")}
    for metric in ("ndcg@10", "recall@100"):
        _task, _metric, queries, a, b, diff, *_ci, t_p, boot_p = lines[metric]
        assert int(queries) == 300
        assert float(a) == pytest.approx(tuned["aggregate"][metric], abs=1e-4)
        assert float(b) == pytest.approx(plain["aggregate"][metric], abs=1e-4)
        assert float(diff) == pytest.approx(tuned["aggregate"][metric] - plain["aggregate"][metric], abs=1e-4)
        assert 0 <= float(t_p) <= 1 and 0 < float(boot_p) <= 1
    assert "t-test p" in result.output and "bootstrap p" in result.output


@pytest.mark.slow
def test_score_reproduces_the_run_folder_figures(scifact_runs, tmp_path):
    root, tuned, _ = scifact_runs
    result = runner.invoke(app, ["score", str(root / "bm25-tuned" / "run.trec"),
                                 str(DATA / "scifact" / "qrels" / "test.tsv"), "-m", "ndcg@10", "-m", "map@100"])
    assert result.exit_code == 0, result.output
    printed = dict(re.findall(r"(\S+@\d+) (\d\.\d{4})", result.output))
    assert float(printed["ndcg@10"]) == pytest.approx(tuned["aggregate"]["ndcg@10"], abs=5e-5)
    assert float(printed["map@100"]) == pytest.approx(tuned["aggregate"]["map@100"], abs=5e-5)
    assert "300 judged queries (0 without results" in result.output


def test_score_bad_input_exits_2_with_file_and_line(tmp_path):
    run_file = tmp_path / "run.trec"
    run_file.write_text("q1 Q0 d1 1 2.0 t\nq2 Q0 d1 1 1.0 t\n")
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    result = runner.invoke(app, ["score", str(run_file), str(qrels)])
    assert result.exit_code == 2
    assert f"{run_file}:2: query 'q2' is not in the qrels" in result.output
    result = runner.invoke(app, ["score", str(run_file), str(qrels), "--skip-unjudged"])
    assert result.exit_code == 0 and "1 unjudged run queries skipped" in result.output

    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td1\thigh\n")
    result = runner.invoke(app, ["score", str(run_file), str(qrels)])
    assert result.exit_code == 2
    assert f"{qrels}:3: relevance grade 'high' is not an integer" in result.output
    assert "Traceback" not in result.output


def test_report_writes_both_files_and_refuses_older_formats(tmp_path):
    runs = tmp_path / "runs"
    write_synthetic_runs(runs)
    result = runner.invoke(app, ["report", str(runs), "-o", str(tmp_path / "report"), "--baseline", "bm25"])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "| System | bright-biology | coir-cosqa | scifact | Average |" in markdown
    assert markdown.index("| hybrid") < markdown.index("| dense") < markdown.index("| bm25 (baseline)")
    hybrid_row = next(line for line in markdown.splitlines() if line.startswith("| hybrid"))
    assert hybrid_row.count("**") == 8 and hybrid_row.count("▲") == 3  # best everywhere, better than bm25

    old = runs / "bm25" / "scifact" / "results.json"
    data = json.loads(old.read_text())
    data["format_version"] = 0
    old.write_text(json.dumps(data))
    result = runner.invoke(app, ["report", str(runs), "-o", str(tmp_path / "report")])
    assert result.exit_code == 2
    assert f"{old}: results format 0" in result.output
    result = runner.invoke(app, ["report", str(runs), "-o", str(tmp_path / "report"), "--skip-invalid"])
    assert result.exit_code == 0 and "1 skipped" in result.output
    assert "Skipped 1 invalid run folder(s)" in (tmp_path / "report" / "leaderboard.md").read_text()


def test_report_and_compare_name_missing_or_unknown_things(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "runs folder not found" in result.output
    runs = tmp_path / "runs"
    write_synthetic_runs(runs)
    result = runner.invoke(app, ["report", str(runs), "--baseline", "bm26"])
    assert result.exit_code == 2 and "baseline 'bm26' is not a run reporting 'ndcg@10'" in result.output
    result = runner.invoke(app, ["report", str(runs), "--baseline", "musique-full"])  # has no ndcg@10
    assert result.exit_code == 2 and "musique-full" in result.output
    result = runner.invoke(app, ["report", str(runs), "--metric", "ndcg@20"])
    assert result.exit_code == 2 and "no run reports metric 'ndcg@20'" in result.output
    result = runner.invoke(app, ["compare", str(runs / "hybrid"), str(runs / "musique-full")])
    assert result.exit_code == 2 and "share no task" in result.output
    # Suites are compared task by task.
    result = runner.invoke(app, ["compare", str(runs / "hybrid"), str(runs / "bm25"), "--samples", "500"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()[2:]] == ["bright-biology", "coir-cosqa",
                                                                            "scifact"]
    _, results, _ = read_run(runs / "hybrid" / "scifact")
    assert results["name"] == "hybrid"
