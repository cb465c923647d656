"""Gold answers as each reader finds them: BEIR/JSONL `answers` or `metadata.answers`, MuSiQue aliases."""

from __future__ import annotations

import json

import pytest

from ragkit.errors import InputError
from ragkit.readers import read_musique
from ragkit.readers.bright import example_to_query
from ragkit.readers.records import query_from


def test_query_answers_from_list_string_or_metadata():
    assert query_from({"_id": "a", "text": "Q?", "answers": ["Paris", " ", "paris"]}, "q.jsonl", 1).answers == \
        ("Paris", "paris")  # blank golds dropped
    assert query_from({"_id": "b", "text": "Q?", "answers": "yes"}, "q.jsonl", 2).answers == ("yes",)
    assert query_from({"_id": "c", "text": "Q?", "metadata": {"answers": ["maybe"]}}, "q.jsonl", 3).answers == \
        ("maybe",)
    assert query_from({"_id": "d", "text": "Q?"}, "q.jsonl", 4).answers == ()
    with pytest.raises(InputError, match=r"q\.jsonl:5: field 'metadata\.answers' must be a string or a list"):
        query_from({"_id": "e", "text": "Q?", "metadata": {"answers": 3}}, "q.jsonl", 5)
    with pytest.raises(InputError, match=r"field 'answers' must be a string or a list of strings"):
        query_from({"_id": "f", "text": "Q?", "answers": [1]}, "q.jsonl", 6)


def test_bright_gold_answer():
    record = {"id": "1", "query": "Q?", "excluded_ids": ["N/A"], "gold_ids": [], "gold_ids_long": []}
    assert example_to_query({**record, "gold_answer": "Because."}, "b.jsonl", 1).answers == ("Because.",)
    assert example_to_query({**record, "gold_answer": "N/A"}, "b.jsonl", 1).answers == ()


def test_musique_answer_with_aliases(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([
        {"question": "Who?", "answer": "Ann Lee", "answer_aliases": ["A. Lee"], "ctxs": [{"text": "Ann did."}]},
        {"question": "Where?", "answers": ["Oslo"], "ctxs": []}]))
    assert [s["answers"] for s in read_musique(path)] == [["Ann Lee", "A. Lee"], ["Oslo"]]
    path.write_text(json.dumps([{"question": "Who?", "answer": "Ann", "answer_aliases": "A", "ctxs": []}]))
    with pytest.raises(InputError, match="entry 0: 'answers' must be a non-empty list"):
        read_musique(path)


def test_reference_must_be_a_cache_mode(tmp_path):
    from typer.testing import CliRunner

    from ragkit.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path / "any.toml"), "--reference", "fast"])
    assert result.exit_code == 2 and "unknown mode 'fast'" in result.output


def test_bundled_answer_sets_match_their_scripts(tmp_path):
    """data/musique-rag is what scripts/convert_musique.py writes, and the counts data/README.md gives."""
    import subprocess
    import sys
    from pathlib import Path

    from ragkit.config import DatasetConfig
    from ragkit.readers import open_dataset

    data = Path(__file__).resolve().parents[1] / "data"
    subprocess.run([sys.executable, str(data.parent / "scripts" / "convert_musique.py"),
                    str(data / "musique" / "musique_s.json.gz"), str(tmp_path)], check=True, capture_output=True)
    for name in ("corpus.jsonl.gz", "queries.jsonl", "qrels/dev.tsv", "qrels/test.tsv"):
        assert (tmp_path / name).read_bytes() == (data / "musique-rag" / name).read_bytes(), name
    for split, questions, judgements in (("test", 100, 1000), ("dev", 50, 500)):
        dataset = open_dataset(DatasetConfig(format="beir", split=split), data / "musique-rag")
        assert len(dataset.queries) == questions and sum(len(j) for j in dataset.qrels.values()) == judgements
        assert all(q.answers for q in dataset.queries)
    assert sum(1 for _ in dataset.documents()) == 1255
    scifact = open_dataset(DatasetConfig(format="beir"), data / "scifact").queries
    assert sorted({q.answers for q in scifact}) == [(), ("no",), ("yes",)]
    assert sum(1 for q in scifact if q.answers) == 188
