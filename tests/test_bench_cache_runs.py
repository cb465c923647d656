"""`ragkit bench cache --runs-dir`: one run folder per reuse mode, readable by the leaderboard."""

import json

from ragkit.bench.cache import write_mode_runs
from ragkit.config import from_dict
from eval.runs import read_run


def test_mode_runs_feed_the_quality_vs_ttft_plot(tmp_path):
    def record(text, ttft, agreement):
        return {"text": text, "golds": ["Paris"], "ttft_s": ttft, "kl": 0.1, "agreement": agreement,
                "recomputed_tokens": 10, "context_tokens": 100}

    modes = {"full": {"per_question": [record("Paris", 2.0, 1.0), record("Lyon", 3.0, 1.0)]},
             "blend@0.05": {"per_question": [record("Paris", 0.5, 0.9), record("Nice", 0.7, 0.8)]}}
    write_mode_runs(tmp_path, from_dict({"name": "mq"}), modes)
    _run, results, _config = read_run(tmp_path / "mq-blend-r0.05")
    assert results["cache_mode"] == "blend@0.05"
    assert results["aggregate"]["f1"] == 0.5 and results["aggregate"]["em"] == 0.5
    assert abs(results["aggregate"]["agreement"] - 0.85) < 1e-9
    assert abs(results["aggregate"]["ttft_s"] - 0.6) < 1e-9
    assert set(results["per_query"]) == {"q0", "q1"}

    from typer.testing import CliRunner
    from ragkit.cli import app

    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(tmp_path), "-o", str(out), "-m", "f1"])
    assert result.exit_code == 0, result.output
    html = (out / "leaderboard.html").read_text()
    assert "plot-quality-ttft" in html and "blend@0.05" in html
    assert "no run with generated answers" not in html
