"""Run folders: round trip, older formats and damaged files give one clear InputError, writes are atomic."""

from __future__ import annotations

import json

import pytest

from eval.runs import FORMAT_VERSION, machine_info, make_results, read_run, task_label, write_run
from eval.trec import drop_unjudged, read_trec_run
from ragkit.errors import InputError
from ragkit.types import Hit, Qrels, Run


def _results(name="sys", **extra):
    config = {"name": name, "dataset": {"format": "bright", "domain": "biology"}}
    return make_results(name, "bright", {"ndcg@10": 0.5}, {"q1": {"ndcg@10": 1.0}, "q2": {"ndcg@10": 0.0}},
                        config, ragkit_version="0.1.0", corpus_fingerprint="abc", seed=3,
                        timings={"search_s": 1.5}, counts={"queries": 2}, **extra), config


def test_round_trip_needs_only_the_folder(tmp_path):
    run = Run({"q1": [Hit("d1", 2.5, 1), Hit("d2", 2.5, 2)], "q2": []}, name="sys")
    results, config = _results(cache_mode="blend")
    write_run(tmp_path / "sys", run, results, config)
    assert sorted(p.name for p in (tmp_path / "sys").iterdir()) == ["config.json", "results.json", "run.trec"]

    back, read_results, read_config = read_run(tmp_path / "sys")
    assert [h.id for h in back["q1"]] == ["d1", "d2"]  # equal scores: the rank column keeps the order
    assert "q2" not in back                             # an empty ranking has no TREC line
    assert read_results == json.loads(json.dumps(results))
    assert read_config == config
    assert read_results["task"] == "bright/biology" and read_results["cache_mode"] == "blend"
    assert read_results["format_version"] == FORMAT_VERSION
    for key in ("ragkit_version", "config_hash", "corpus_fingerprint", "machine", "created", "seed", "timings"):
        assert key in read_results


def test_machine_info_and_task_labels():
    info = machine_info()
    assert info["cpu_count"] >= 1 and "torch_threads" in info and "gpu" in info
    assert task_label({"dataset": {"format": "coir", "task": "cosqa"}}) == "coir/cosqa"
    assert task_label({"dataset": {"format": "beir", "path": "../data/scifact"}}) == "scifact"
    assert task_label({"dataset": {"format": "bright", "domain": "biology", "long_documents": True}}) \
        == "bright/biology-long"


def test_older_format_is_refused_with_the_file_named(tmp_path):
    results, config = _results()
    write_run(tmp_path / "old", Run({}), results, config)
    path = tmp_path / "old" / "results.json"
    data = json.loads(path.read_text())
    data["format_version"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as info:
        read_run(tmp_path / "old")
    assert info.value.path == str(path)
    assert "format 0" in str(info.value) and "re-run `ragkit eval" in str(info.value)


@pytest.mark.parametrize("damage", ["no_results", "bad_json", "no_config", "missing_key", "bad_trec"])
def test_damaged_folders_raise_input_error(tmp_path, damage):
    results, config = _results()
    folder = tmp_path / "r"
    write_run(folder, Run({"q1": [Hit("d1", 1.0, 1)]}), results, config)
    if damage == "no_results":
        (folder / "results.json").unlink()
    elif damage == "bad_json":
        (folder / "results.json").write_text("{not json")
    elif damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "missing_key":
        data = json.loads((folder / "results.json").read_text())
        del data["per_query"]
        (folder / "results.json").write_text(json.dumps(data))
    else:
        (folder / "run.trec").write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 two 0.4 tag\n")
    with pytest.raises(InputError) as info:
        read_run(folder)
    if damage == "bad_trec":
        assert info.value.line == 2 and info.value.path.endswith("run.trec")
    with pytest.raises(InputError, match="not found"):
        read_run(tmp_path / "absent")


def test_failed_write_leaves_the_previous_run_in_place(tmp_path):
    results, config = _results()
    write_run(tmp_path / "r", Run({"q1": [Hit("d1", 1.0, 1)]}), results, config)
    with pytest.raises(TypeError):  # a value JSON cannot encode, after run.trec was already written
        write_run(tmp_path / "r", Run({"q1": [Hit("d9", 1.0, 1)]}), {**results, "bad": object()}, config)
    back, _, _ = read_run(tmp_path / "r")
    assert [h.id for h in back["q1"]] == ["d1"]
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary folder left behind


def test_trec_reader_rejects_duplicates_and_unjudged_queries(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 d1 1 2.0 t\nq1 Q0 d1 2 1.0 t\n")
    with pytest.raises(InputError, match="listed twice") as info:
        read_trec_run(path)
    assert info.value.line == 2
    path.write_text("q1 Q0 d1 1 2.0 t\nq7 Q0 d1 1 1.0 t\n")
    run = read_trec_run(path)
    with pytest.raises(InputError, match="'q7' is not in the qrels") as info:
        drop_unjudged(path, run, Qrels({"q1": {"d1": 1}}))
    assert info.value.line == 2
    kept, skipped = drop_unjudged(path, run, Qrels({"q1": {"d1": 1}}), skip=True)
    assert list(kept) == ["q1"] and skipped == ["q7"]
