"""Suites: one config lists several tasks; `ragkit eval` writes one run per task and their average."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eval.runs import read_run
from ragkit.cli import app
from ragkit.config import load_config
from ragkit.errors import ConfigError

DATA = Path(__file__).resolve().parent.parent / "data"
runner = CliRunner()


def _suite(tmp_path: Path, tasks: str) -> Path:
    config = tmp_path / "bright-bm25.toml"
    config.write_text(f"""
name = "bright-bm25"
[dataset]
format = "bright"
path = "{DATA / 'bright'}"
[chunking]
size = 128
overlap = 16
[retrieval]
k = 100
index_dir = "{tmp_path / 'indexes'}"
retrievers = [{{ type = "bm25", k1 = 0.9, b = 0.4 }}]
[eval]
protocol = "bright"
runs_dir = "{tmp_path / 'runs'}"
metrics = ["ndcg@10", "recall@1", "recall@100"]
{tasks}
""")
    return config


def test_task_configs_override_dataset_keys_and_nest_folders(tmp_path):
    cfg = load_config(_suite(tmp_path, '[[tasks]]\ndomain = "biology"\n[[tasks]]\ndomain = "biology"\n'
                                       'long_documents = true\nname = "biology-long"\n'))
    first, second = cfg.task_configs()
    assert (first.task, first.dataset.domain, first.dataset.long_documents) == ("biology", "biology", False)
    assert (second.task, second.dataset.long_documents) == ("biology-long", True)
    assert second.run_dir() == tmp_path / "runs" / "bright-bm25" / "biology-long"
    assert second.index_dir() == tmp_path / "indexes" / "biology-long"
    assert second.tasks == [] and "task" not in second.to_dict()


@pytest.mark.parametrize("tasks, key", [
    ('[[tasks]]\ndomain = "biology"\n[[tasks]]\ndomain = "biology"\n', "tasks[1]"),
    ('[[tasks]]\ndomian = "biology"\n', "tasks[0].domian"),
    ('[[tasks]]\ndomain = "biology"\nname = "a/b"\n', "tasks[0].name"),
])
def test_bad_task_lists_name_the_key(tmp_path, tasks, key):
    with pytest.raises(ConfigError, match=rf"'{key.replace('[', '.').replace(']', '.')}'"):
        load_config(_suite(tmp_path, tasks))


def test_a_task_must_be_a_table(tmp_path):
    with pytest.raises(ConfigError, match=r"'tasks\[0\]': each task is a table"):
        load_config(_suite(tmp_path, ""), overrides={"tasks": ["biology"]})


def test_eval_suite_writes_each_task_and_the_average(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _suite(tmp_path, '[[tasks]]\ndomain = "biology"\n[[tasks]]\ndomain = "leetcode"\n')
    result = runner.invoke(app, ["eval", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["task", "ndcg@10", "recall@1", "recall@100"]
    assert [line.split()[0] for line in lines[1:4]] == ["bright/biology", "bright/leetcode", "average"]

    suite_dir = tmp_path / "runs" / "bright-bm25"
    summary = json.loads((suite_dir / "suite.json").read_text())
    for metric, value in summary["average"].items():
        assert value == pytest.approx(sum(t[metric] for t in summary["tasks"].values()) / 2)
    # The leetcode run obeys BRIGHT's rule: no excluded id is left in the scored ranking.
    run, results, _ = read_run(suite_dir / "leetcode")
    excluded = {json.loads(line)["id"]: set(json.loads(line)["excluded_ids"])
                for line in open(DATA / "bright" / "examples" / "leetcode.jsonl", encoding="utf-8")}
    assert results["counts"]["scored_queries"] == 5
    assert all(not ({h.id for h in hits} & excluded[qid]) for qid, hits in run.items())

    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "| System | bright/biology | bright/leetcode | Average |" in markdown
    assert f"{summary['average']['ndcg@10']:.4f}" in markdown
