"""JSON Lines, plain-text folders, BRIGHT and CoIR (local folders; the hub path through a local
`datasets` folder or a stand-in), and MuSiQue samples."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ragkit.config import DatasetConfig
from ragkit.errors import InputError
from ragkit.readers import coir, open_dataset, read_musique
from tests.test_readers import DOCS, QRELS, QUERIES, make_beir, write_lines


def open_as(fmt: str, path: Path, skip: bool = False, **cfg):
    return open_dataset(DatasetConfig(format=fmt, **cfg), path, skip_bad_lines=skip)


# --- JSON Lines --------------------------------------------------------------------------------------------------

def test_jsonl_file_with_id_and_contents_keys(tmp_path):
    corpus = write_lines(tmp_path / "docs.jsonl.gz",
                         [json.dumps({"id": "a", "contents": "alpha"}), json.dumps({"id": "b", "text": "beta",
                                                                                    "title": "B"})], gz=True)
    dataset = open_as("jsonl", corpus)
    assert [(d.id, d.text, d.title) for d in dataset.documents()] == [("a", "alpha", ""), ("b", "beta", "B")]
    assert dataset.name == "docs" and dataset.queries == [] and dataset.qrels is None


def test_jsonl_folder_with_queries_but_no_qrels_keeps_all_queries(tmp_path):
    make_beir(tmp_path)
    (tmp_path / "qrels" / "test.tsv").unlink()
    dataset = open_as("jsonl", tmp_path)
    assert [q.id for q in dataset.queries] == ["q1", "q2", "q3"] and dataset.qrels is None
    assert len(list(dataset.documents())) == 3


def test_jsonl_folder_with_qrels_pairs_like_beir(tmp_path):
    dataset = open_as("jsonl", make_beir(tmp_path))
    assert [q.id for q in dataset.queries] == ["q1", "q2"] and dataset.dropped_queries == 1


def test_jsonl_errors(tmp_path):
    with pytest.raises(InputError, match="corpus file not found"):
        open_as("jsonl", tmp_path)
    corpus = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "a", "text": t}) for t in ("x", "y")])
    with pytest.raises(InputError, match=r"c\.jsonl:2: duplicate document id 'a'"):
        list(open_as("jsonl", corpus).documents())
    empty = write_lines(tmp_path / "e.jsonl", [])
    with pytest.raises(InputError, match=r"e\.jsonl: empty corpus"):
        list(open_as("jsonl", empty).documents())


# --- plain-text folders ------------------------------------------------------------------------------------------

def test_textdir_reads_txt_files_in_path_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bravo")
    (tmp_path / "sub" / "a.txt").write_text("alpha\nmore")
    (tmp_path / "notes.md").write_text("ignored")
    dataset = open_as("textdir", tmp_path)
    assert [(d.id, d.text) for d in dataset.documents()] == [("b.txt", "bravo"), ("sub/a.txt", "alpha\nmore")]
    first = dataset.fingerprint
    (tmp_path / "b.txt").write_text("bravo!")
    assert open_as("textdir", tmp_path).fingerprint != first


@pytest.mark.parametrize(
    "name, data, problem, line",
    [
        ("bad.txt", b"ok\nstill ok\ncaf\xe9\n", "not valid UTF-8 (byte 0xe9)", 3),
        ("empty.txt", b" \n", "empty file", None),
        ("has space.txt", b"text", "file name contains whitespace", None),
    ],
)
def test_textdir_bad_files(tmp_path, name, data, problem, line):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError) as info:
        list(open_as("textdir", tmp_path).documents())
    assert (info.value.path, info.value.line) == (str(tmp_path / name), line) and problem in str(info.value)
    dataset = open_as("textdir", tmp_path, skip=True)
    assert [d.id for d in dataset.documents()] == ["good.txt"] and dataset.skipped.total == 1


def test_textdir_empty_folder_and_missing_folder(tmp_path):
    with pytest.raises(InputError, match="empty corpus"):
        list(open_as("textdir", tmp_path).documents())
    with pytest.raises(InputError, match="dataset path not found"):
        open_as("textdir", tmp_path / "missing")


# --- BRIGHT ------------------------------------------------------------------------------------------------------

def bright_example(qid, gold, long=("N/A",), excluded=("N/A",), answer="N/A"):
    return {"query": f"question {qid}", "reasoning": "r", "id": qid, "excluded_ids": list(excluded),
            "gold_ids_long": list(long), "gold_ids": list(gold), "gold_answer": answer}


def make_bright(root: Path, examples, documents, domain="biology", long_documents=None) -> Path:
    write_lines(root / "examples" / f"{domain}.jsonl", [json.dumps(e) for e in examples])
    write_lines(root / "documents" / f"{domain}.jsonl.gz", [json.dumps(d) for d in documents], gz=True)
    if long_documents is not None:
        write_lines(root / "long_documents" / f"{domain}.jsonl", [json.dumps(d) for d in long_documents])
    return root


BRIGHT_EXAMPLES = [
    bright_example("0", ["t/a_0.txt", "t/a_1.txt"], long=["t/a.txt"], answer="Because."),
    bright_example("1", ["t/b_0.txt"], long=["t/b.txt"], excluded=["t/a_0.txt", "N/A"]),
]
BRIGHT_DOCS = [{"id": i, "content": f"text of {i}"} for i in ("t/a_0.txt", "t/a_1.txt", "t/b_0.txt", "t/c_0.txt")]


def test_bright_local_folder(tmp_path):
    root = make_bright(tmp_path, BRIGHT_EXAMPLES, BRIGHT_DOCS)
    dataset = open_as("bright", root, domain="biology")
    assert dataset.name == "bright-biology"
    assert [d.id for d in dataset.documents()] == [d["id"] for d in BRIGHT_DOCS]
    first, second = dataset.queries
    assert first.text == "question 0" and first.answers == ("Because.",) and first.excluded_ids == frozenset()
    assert second.answers == () and second.excluded_ids == {"t/a_0.txt"}
    assert first.metadata["gold_ids_long"] == ["t/a.txt"]
    assert dataset.qrels.to_dict() == {"0": {"t/a_0.txt": 1, "t/a_1.txt": 1}, "1": {"t/b_0.txt": 1}}


def test_bright_long_documents_switch_corpus_and_gold_ids(tmp_path):
    root = make_bright(tmp_path, BRIGHT_EXAMPLES, BRIGHT_DOCS,
                       long_documents=[{"id": "t/a.txt", "content": "A"}, {"id": "t/b.txt", "content": "B"}])
    dataset = open_as("bright", root, domain="biology", long_documents=True)
    assert dataset.name == "bright-biology-long"
    assert [d.id for d in dataset.documents()] == ["t/a.txt", "t/b.txt"]
    assert dataset.qrels.to_dict() == {"0": {"t/a.txt": 1}, "1": {"t/b.txt": 1}}


def test_bright_domain_spelling_and_errors(tmp_path):
    make_bright(tmp_path, BRIGHT_EXAMPLES, BRIGHT_DOCS, domain="earth_science")
    assert open_as("bright", tmp_path, domain="earth-science").name == "bright-earth_science"
    with pytest.raises(InputError, match="needs a domain"):
        open_as("bright", tmp_path)
    with pytest.raises(InputError, match="long_documents file not found"):
        open_as("bright", tmp_path, domain="earth_science", long_documents=True)
    no_long = make_bright(tmp_path / "x", [bright_example("0", ["t/a_0.txt"])], BRIGHT_DOCS, domain="leetcode")
    with pytest.raises(InputError, match="no query of domain 'leetcode' has gold_ids_long"):
        open_as("bright", no_long, domain="leetcode", long_documents=True)
    with pytest.raises(InputError, match="no BRIGHT examples for domain 'pony'.*domains here: earth_science"):
        open_as("bright", tmp_path, domain="pony")


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"id": "9", "gold_ids": ["x"], "excluded_ids": [], "gold_ids_long": []}, "missing field 'query'"),
        ({"id": "9", "query": "q", "gold_ids": "x", "excluded_ids": [], "gold_ids_long": []},
         "'gold_ids' must be a list of strings"),
        ({"id": "9", "query": "q", "gold_ids": ["x"], "gold_ids_long": []}, "'excluded_ids' must be a list"),
    ],
)
def test_bright_bad_example_line(tmp_path, record, problem):
    root = make_bright(tmp_path, BRIGHT_EXAMPLES + [record], BRIGHT_DOCS)
    with pytest.raises(InputError) as info:
        open_as("bright", root, domain="biology")
    assert info.value.line == 3 and problem in str(info.value)
    assert open_as("bright", root, domain="biology", skip=True).skipped.counts == {"queries": 1}


def test_bright_bad_document_line(tmp_path):
    root = make_bright(tmp_path, BRIGHT_EXAMPLES, BRIGHT_DOCS + [{"id": "t/d.txt", "text": "wrong key"}])
    with pytest.raises(InputError, match=r"biology\.jsonl\.gz:5: missing field 'content'"):
        list(open_as("bright", root, domain="biology").documents())


def test_bright_through_datasets_from_a_local_hub_style_folder(tmp_path):
    """A folder laid out like the hub repo (configs declared in README.md) is read through `datasets`."""
    write_lines(tmp_path / "ex" / "biology.jsonl", [json.dumps(e) for e in BRIGHT_EXAMPLES])
    write_lines(tmp_path / "docs" / "biology.jsonl", [json.dumps(d) for d in BRIGHT_DOCS])
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: examples\n  data_files:\n  - split: biology\n    path: ex/biology.jsonl\n"
        "- config_name: documents\n  data_files:\n  - split: biology\n    path: docs/biology.jsonl\n---\n")
    dataset = open_as("bright", tmp_path, domain="biology")
    assert [d.id for d in dataset.documents()] == [d["id"] for d in BRIGHT_DOCS]
    assert dataset.qrels.to_dict() == {"0": {"t/a_0.txt": 1, "t/a_1.txt": 1}, "1": {"t/b_0.txt": 1}}
    assert dataset.queries[1].excluded_ids == {"t/a_0.txt"}
    assert len(dataset.fingerprint) == 16
    with pytest.raises(InputError, match=r"^/.*/examples/pony: cannot load"):
        open_as("bright", tmp_path, domain="pony")


# --- CoIR --------------------------------------------------------------------------------------------------------

def test_coir_local_folder_is_beir_without_titles(tmp_path):
    dataset = open_as("coir", make_beir(tmp_path), task="cosqa", title=False)
    assert dataset.name == "coir-cosqa" and [q.id for q in dataset.queries] == ["q1", "q2"]
    assert [(d.id, d.title) for d in dataset.documents()] == [("d1", ""), ("d2", ""), ("3", "")]
    assert next(open_as("coir", tmp_path, task="cosqa").documents()).title == "Cats"


class FakeHub:
    """Stands in for HubSplit: serves rows per (repo, split) as `datasets` would."""

    tables: dict = {}

    def __init__(self, repo, config, split):
        self.where = f"hf://{repo}/{config or 'default'}/{split}"
        self.rows = self.tables[(repo, split)]
        self.fingerprint = "f" * 16

    def records(self):
        return ((self.where, n, row) for n, row in enumerate(self.rows, 1))


def test_coir_hub_pair_keeps_judged_queries(monkeypatch):
    corpus = [dict(d, _id=str(d["_id"]), partition="corpus", language="python") for d in DOCS]
    queries = [dict(q, partition="test") for q in QUERIES]
    qrels = [{"query-id": "q1", "corpus-id": "d1", "score": 1}, {"query-id": "q2", "corpus-id": "3", "score": 1}]
    FakeHub.tables = {("CoIR-Retrieval/cosqa-queries-corpus", "corpus"): corpus,
                      ("CoIR-Retrieval/cosqa-queries-corpus", "queries"): queries,
                      ("CoIR-Retrieval/cosqa-qrels", "test"): qrels}
    monkeypatch.setattr(coir, "HubSplit", FakeHub)
    dataset = open_dataset(DatasetConfig(format="coir", path="CoIR-Retrieval", task="cosqa"), Path("/nonexistent/x"))
    assert dataset.name == "coir-cosqa" and [q.id for q in dataset.queries] == ["q1", "q2"]
    assert dataset.qrels.to_dict() == {"q1": {"d1": 1}, "q2": {"3": 1}}
    assert [d.id for d in dataset.documents()] == ["d1", "d2", "3"]
    qrels.append({"query-id": "q1", "corpus-id": "d2", "score": "1"})
    with pytest.raises(InputError, match=r"hf://CoIR-Retrieval/cosqa-qrels/default/test:3: relevance grade '1'"):
        open_dataset(DatasetConfig(format="coir", path="hf://CoIR-Retrieval/cosqa-queries-corpus"),
                     Path("/nonexistent/x"))


def test_coir_needs_task_or_full_id(tmp_path):
    with pytest.raises(InputError, match="CoIR needs a task"):
        open_dataset(DatasetConfig(format="coir", path="CoIR-Retrieval"), tmp_path / "CoIR-Retrieval")
    with pytest.raises(InputError, match="CoIR dataset not found"):
        open_dataset(DatasetConfig(format="coir", path="not a hub id"), tmp_path / "nope")


# --- MuSiQue -----------------------------------------------------------------------------------------------------

def test_read_musique(tmp_path):
    sample = [{"question": "Who?", "answers": ["Ann"], "ctxs": [{"title": "", "text": "Ann did."}]}]
    path = tmp_path / "m.json.gz"
    path.write_bytes(gzip.compress(json.dumps(sample).encode()))
    assert read_musique(path) == [{"id": "0", "question": "Who?", "answers": ["Ann"],
                                   "ctxs": [{"title": "", "text": "Ann did."}]}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(sample + [{"question": "Why?", "answers": [], "ctxs": []}]))
    with pytest.raises(InputError, match=r"bad\.json: entry 1: 'answers' must be a non-empty list"):
        read_musique(path)
    path.write_text('[{"question": "Who?",\n "answers": ]')
    with pytest.raises(InputError, match=r"bad\.json:2: not valid JSON"):
        read_musique(path)
