"""End to end on a tiny BEIR folder: index, retrieve, evaluate, reload; the CLI on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.cli import app
from ragkit.errors import IndexMismatchError
from ragkit.pipeline import Pipeline

DOCS = [
    ("d1", "Vitamin D", "Vitamin D supplements reduce the risk of bone fractures in older adults."),
    ("d2", "Statins", "Statins lower cholesterol and the risk of heart attacks."),
    ("d3", "Sleep", "Short sleep is linked to obesity in children and adults."),
    ("d4", "Coffee", "Coffee consumption is associated with lower liver disease mortality."),
    ("d5", "Aspirin", "Daily aspirin reduces colorectal cancer incidence over long follow-up."),
    ("d6", "Exercise", "Aerobic exercise improves memory in older adults with mild impairment."),
]
QUERIES = [("q1", "vitamin D fractures"), ("q2", "cholesterol statins heart"), ("q3", "coffee liver")]
QRELS = [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d4", 2)]


def make_beir(folder: Path, docs=DOCS, queries=QUERIES, qrels=QRELS) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as fh:
        for doc_id, title, text in docs:
            fh.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as fh:
        for qid, text in queries:
            fh.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(folder / "qrels" / "test.tsv", "w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, doc_id, grade in qrels:
            fh.write(f"{qid}\t{doc_id}\t{grade}\n")
    return folder


def make_config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f"""
name = "tiny"
[dataset]
format = "beir"
path = "data"
[chunking]
size = 64
overlap = 8
[retrieval]
k = 10
index_dir = "{tmp_path / 'indexes' / 'tiny'}"
retrievers = [{{ type = "bm25" }}]
[eval]
runs_dir = "{tmp_path / 'runs'}"
metrics = ["ndcg@10", "recall@100", "mrr"]
{extra}
""")
    return cfg


@pytest.fixture
def tiny(tmp_path):
    make_beir(tmp_path / "data")
    return make_config(tmp_path)


def test_index_retrieve_evaluate_reload(tiny, tmp_path):
    p = Pipeline.from_config(tiny, progress=False)
    info = p.index()
    assert info["documents"] == 6 and info["chunks"] == 6
    manifest = json.loads((tmp_path / "indexes/tiny/manifest.json").read_text())
    assert manifest["corpus_fingerprint"] and manifest["config_hash"] and manifest["ragkit_version"]
    hits = p.retrieve("statins cholesterol", k=3)
    assert hits[0].id == "d2#0" and [h.rank for h in hits] == list(range(1, len(hits) + 1))

    results = p.evaluate()
    assert results["aggregate"]["ndcg@10"] == pytest.approx(1.0)
    assert set(results["per_query"]) == {"q1", "q2", "q3"}
    run_dir = Path(results["run_dir"])
    assert {"run.trec", "results.json", "config.json"} <= {f.name for f in run_dir.iterdir()}

    again = Pipeline.from_config(tiny, progress=False)
    assert again.retrieve("statins cholesterol", k=3) == hits


def test_index_from_another_corpus_is_refused(tiny, tmp_path):
    Pipeline.from_config(tiny, progress=False).index()
    docs = DOCS[:-1] + [("d6", "Exercise", "Changed text.")]
    make_beir(tmp_path / "data", docs=docs)
    with pytest.raises(IndexMismatchError, match="another corpus"):
        Pipeline.from_config(tiny, progress=False).retrieve("x")


runner = CliRunner()


def test_cli_eval_json(tiny):
    result = runner.invoke(app, ["eval", str(tiny), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    assert payload["aggregate"]["ndcg@10"] == pytest.approx(1.0)


def _corrupt(tmp_path, case):
    data = tmp_path / "data"
    if case == "malformed_json":
        with open(data / "corpus.jsonl", "a") as fh:
            fh.write('{"_id": "d7", "text": \n')
        return "corpus.jsonl:7"
    if case == "duplicate_id":
        with open(data / "corpus.jsonl", "a") as fh:
            fh.write(json.dumps({"_id": "d2", "text": "again"}) + "\n")
        return "d2"
    if case == "empty_corpus":
        (data / "corpus.jsonl").write_text("")
        return "corpus.jsonl"
    if case == "missing_qrels":
        (data / "qrels" / "test.tsv").unlink()
        return "test.tsv"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["malformed_json", "duplicate_id", "empty_corpus", "missing_qrels"])
def test_bad_corpus_exits_2_and_leaves_nothing(tiny, tmp_path, case):
    needle = _corrupt(tmp_path, case)
    result = runner.invoke(app, ["eval", str(tiny), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and needle in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "indexes" / "tiny").exists()
    assert not (tmp_path / "runs" / "tiny").exists()
    leftovers = [p for p in (tmp_path / "indexes").glob(".*")] if (tmp_path / "indexes").exists() else []
    assert leftovers == []


def test_unknown_config_key_exits_2(tmp_path):
    make_beir(tmp_path / "data")
    cfg = make_config(tmp_path, extra="[generator]\nmodle = 'x'\n")
    result = runner.invoke(app, ["index", str(cfg)])
    assert result.exit_code == 2
    assert "generator.modle" in result.stderr


def test_config_naming_missing_dataset_exits_2(tmp_path):
    cfg = make_config(tmp_path)  # no data folder written
    result = runner.invoke(app, ["eval", str(cfg), "--quiet"])
    assert result.exit_code == 2
    assert "data" in result.stderr and "Traceback" not in result.output


def test_missing_config_file_exits_2(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "nope.toml" in result.stderr
