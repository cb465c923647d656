"""`ragkit bench cache --frontier`: its points, bootstrap intervals, plot, and refusals of bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ragkit.bench.frontier import format_frontier, frontier_points, kl_at_speedup, summarise_points, write_frontier
from ragkit.cli import app
from ragkit.errors import InputError

runner = CliRunner()


def test_points_sweep_budgeted_selectors_and_run_the_others_once():
    assert frontier_points(["full", "blend", "query", "epic"], [0.1, 0.3]) == [
        "blend@0.1", "blend@0.3", "query@0.1", "query@0.3", "epic"]
    assert frontier_points(["blend", "query", "query@0.3", "query@0.1"], [0.1]) == [
        "blend@0.1", "query@0.1", "query@0.3"]  # an extra point on query's line, each point once
    with pytest.raises(InputError, match="no points"):
        frontier_points(["full"], [0.1])
    with pytest.raises(InputError, match="no points"):
        frontier_points(["query"], [])


@pytest.mark.parametrize("args, problem", [
    (["--modes", "blend,magic"], "unknown selector 'magic'"),
    (["--budgets", "0.1,1.5"], "budget 1.5 is outside (0, 1]"),
    (["--budgets", "0,0.2"], "budget 0 is outside (0, 1]"),
    (["--budgets", "a,b"], "expected comma-separated shares"),
    (["--modes", "full"], "no points to run"),
    (["--modes", "blend,query@1.5"], "'query@1.5': SELECTOR@R takes a share R in (0, 1]"),
    (["--modes", "epic@0.2"], "'epic@0.2': SELECTOR@R takes a share"),
    (["--modes", "magic@0.2"], "unknown selector 'magic'"),
    (["--modes", "query", "--budgets", ""], "no points to run"),
])
def test_bad_frontier_input_is_one_line_and_exit_2_before_a_model_loads(args, problem, monkeypatch):
    import generators.rag

    monkeypatch.setattr(generators.rag, "RagGenerator", lambda *a, **k: pytest.fail("loaded a model"))
    result = runner.invoke(app, ["bench", "cache", "--frontier", "--limit", "1", *args])
    assert result.exit_code == 2 and problem in result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: ")


def _record(ttft, kl, matches, decisive_matches, probe=0.0):
    return {"ttft_s": ttft, "kl": kl, "kl_answer": kl / 2, "matches": matches, "reference_tokens": 4,
            "decisive": 2, "decisive_matches": decisive_matches, "probe_s": probe, "recompute_share": 0.25,
            "context_tokens": 100}


def test_points_carry_paired_bootstrap_intervals_around_their_figures(tmp_path):
    full = [_record(t, 0.0, 4, 2) for t in (10.0, 12.0, 8.0, 11.0, 9.0)]
    query = [_record(t, kl, 4, d, probe=0.1) for t, kl, d in
             ((2.0, 0.01, 2), (3.0, 0.03, 2), (2.0, 0.02, 1), (2.5, 0.00, 2), (2.0, 0.04, 2))]
    points = summarise_points({"full": {"per_question": full}, "query@0.2": {"per_question": query}})
    p = points["query@0.2"]
    assert p["selector"] == "query" and p["budget"] == 0.2
    assert p["speedup"] == pytest.approx(10.0 / 2.0) and p["first_token_kl"] == pytest.approx(0.02)
    assert p["decisive_agreement"] == pytest.approx(9 / 10) and p["agreement"] == 1.0
    assert p["first_pass_share"] == pytest.approx(0.1 / 2.3) and p["answer_kl"] == pytest.approx(0.01)
    for key in ("speedup", "first_token_kl", "decisive_agreement", "answer_kl"):
        low, high = p[f"{key}_ci95"]
        assert low <= p[key] <= high
    assert p["first_token_kl_ci95"][0] < p["first_token_kl_ci95"][1]  # questions differ: the interval is not a point
    assert p["agreement_ci95"] == [1.0, 1.0]
    settings = {"questions": 5, "offset": 33, "chunks": 10, "device": "cpu", "threads": 1, "full_ttft_median_s": 10.0}
    files = write_frontier(tmp_path / "out", points, settings)
    assert files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(files[0].read_text())["points"]["query@0.2"]["speedup"] == pytest.approx(5.0)
    report = format_frontier({"settings": settings, "points": points, "files": [str(f) for f in files]})
    assert "query@0.2" in report and "5.00 [" in report and "frontier.png" in report


def test_the_frontier_command_runs_points_beside_full_and_writes_its_plot(tmp_path):
    """End to end on a tiny random model: two held-out questions, two passages each."""
    from tests.conftest import tiny_llama

    folder = tiny_llama(tmp_path / "model")
    out = tmp_path / "frontier"
    result = runner.invoke(app, ["bench", "cache", "configs/musique-blend.toml", "--frontier", "--modes", "query,naive",
                                 "--budgets", "0.2,1", "--offset", "33", "--limit", "2", "--chunks", "2", "--out",
                                 str(out), "--json", "--set", f"generator.model={folder}",
                                 "--set", "generator.max_new_tokens=3"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert sorted(data["points"]) == ["naive", "query@0.2", "query@1"] and data["settings"]["offset"] == 33
    at_one = data["points"]["query@1"]
    assert at_one["first_token_kl"] < 1e-8 and at_one["agreement"] == 1.0 and at_one["first_pass_share"] == 0.0
    assert data["points"]["query@0.2"]["first_pass_share"] > 0 and data["points"]["naive"]["recompute_share"] == 0
    assert (out / "frontier.png").stat().st_size > 1000
    assert json.loads((out / "frontier.json").read_text())["points"].keys() == data["points"].keys()


def test_a_selector_is_compared_with_another_at_the_same_speedup_only_inside_its_range():
    points = {"blend@0.1": {"selector": "blend", "speedup": 6.0, "first_token_kl": 0.08},
              "blend@0.3": {"selector": "blend", "speedup": 2.0, "first_token_kl": 0.02},
              "query@0.1": {"selector": "query", "speedup": 5.0, "first_token_kl": 0.03}}
    assert kl_at_speedup(points, "blend", 5.0) == pytest.approx(0.065)
    assert kl_at_speedup(points, "blend", 7.0) is None and kl_at_speedup(points, "query", 5.0) == 0.03
