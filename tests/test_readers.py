"""BEIR folder reading, qrels files, and every kind of bad input naming its file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ragkit.config import DatasetConfig
from ragkit.errors import InputError
from ragkit.readers import open_dataset, read_qrels_trec, read_qrels_tsv

DOCS = [
    {"_id": "d1", "title": "Cats", "text": "Cats purr.", "metadata": {"lang": "en"}},
    {"_id": "d2", "title": "", "text": "Dogs bark."},
    {"_id": 3, "text": "Numeric ids become strings."},
]
QUERIES = [{"_id": "q1", "text": "what purrs"}, {"_id": "q2", "text": "what barks"}, {"_id": "q3", "text": "unjudged"}]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\td1\t0\n"


def write_lines(path: Path, lines: list[str], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_beir(root: Path, docs=DOCS, queries=QUERIES, qrels=QRELS, gz: bool = False, corpus_lines=None) -> Path:
    write_lines(root / ("corpus.jsonl.gz" if gz else "corpus.jsonl"),
                corpus_lines if corpus_lines is not None else [json.dumps(d) for d in docs], gz=gz)
    write_lines(root / "queries.jsonl", [json.dumps(q) for q in queries])
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(qrels)
    return root


def beir(root: Path, skip: bool = False, **cfg):
    return open_dataset(DatasetConfig(format="beir", **cfg), root, skip_bad_lines=skip)


def error_of(root: Path, **cfg) -> InputError:
    with pytest.raises(InputError) as info:
        dataset = beir(root, **cfg)
        list(dataset.documents())
    return info.value


@pytest.mark.parametrize("gz", [False, True])
def test_beir_happy_path(tmp_path, gz):
    dataset = beir(make_beir(tmp_path, gz=gz))
    docs = list(dataset.documents())
    assert [d.id for d in docs] == ["d1", "d2", "3"]
    assert docs[0].title == "Cats" and docs[0].text == "Cats purr." and docs[0].metadata == {"lang": "en"}
    # Only judged queries are kept, in file order, as BEIR's GenericDataLoader does.
    assert [q.id for q in dataset.queries] == ["q1", "q2"]
    assert dataset.dropped_queries == 1
    assert dataset.qrels.to_dict() == {"q1": {"d1": 1}, "q2": {"d2": 2, "d1": 0}}
    assert list(dataset.documents()) == docs  # re-iterable
    assert dataset.skipped.total == 0


def test_fingerprint_follows_corpus_bytes(tmp_path):
    first = beir(make_beir(tmp_path / "a")).fingerprint
    assert beir(make_beir(tmp_path / "b")).fingerprint == first
    changed = make_beir(tmp_path / "c", docs=DOCS[:2] + [{"_id": "3", "text": "Other."}])
    assert beir(changed).fingerprint != first


def test_limit_queries_limits_qrels_too(tmp_path):
    dataset = beir(make_beir(tmp_path), limit_queries=1)
    assert [q.id for q in dataset.queries] == ["q1"]
    assert list(dataset.qrels) == ["q1"]


def test_crlf_bom_and_blank_lines_are_fine(tmp_path):
    lines = ["\ufeff" + json.dumps(DOCS[0]) + "\r", "", "  ", json.dumps(DOCS[1]) + "\r"]
    dataset = beir(make_beir(tmp_path, corpus_lines=lines))
    assert [d.id for d in dataset.documents()] == ["d1", "d2"]


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"_id": "d9", "text": ', "not valid JSON"),
        ('["d9", "text"]', "expected a JSON object"),
        ('{"text": "no id"}', "missing id field"),
        ('{"_id": "d9"}', "missing field 'text'"),
        ('{"_id": "d9", "text": 5}', "field 'text' must be a string"),
        ('{"_id": "d 9", "text": "x"}', "contains whitespace"),
        ('{"_id": "d9", "text": "x", "metadata": [1]}', "'metadata' must be an object"),
        ('{"_id": "d1", "text": "again"}', "duplicate document id 'd1' (first seen at line 1)"),
    ],
)
def test_bad_corpus_line_names_file_and_line(tmp_path, bad_line, problem):
    lines = [json.dumps(d) for d in DOCS]
    lines.insert(2, bad_line)
    root = make_beir(tmp_path, corpus_lines=lines)
    error = error_of(root)
    assert error.path == str(root / "corpus.jsonl") and error.line == 3
    assert problem in str(error)
    assert str(error).startswith(f"{root / 'corpus.jsonl'}:3: ")

    dataset = beir(root, skip=True)
    assert [d.id for d in dataset.documents()] == ["d1", "d2", "3"]
    assert dataset.skipped.counts == {"corpus": 1}
    assert problem in dataset.skipped.summary()
    list(dataset.documents())  # a second pass does not double the count
    assert dataset.skipped.total == 1


def test_non_utf8_line(tmp_path):
    root = make_beir(tmp_path)
    with open(root / "corpus.jsonl", "ab") as fh:
        fh.write(b'{"_id": "d9", "text": "caf\xe9"}\n')
    error = error_of(root)
    assert (error.line, "not valid UTF-8 (byte 0xe9") == (4, str(error).split(": ", 1)[1][:26])
    dataset = beir(root, skip=True)
    assert len(list(dataset.documents())) == 3 and dataset.skipped.total == 1


def test_broken_gzip_is_one_error(tmp_path):
    root = make_beir(tmp_path, gz=True)
    data = (root / "corpus.jsonl.gz").read_bytes()
    (root / "corpus.jsonl.gz").write_bytes(data[: len(data) // 2])
    assert "broken gzip data" in str(error_of(root))


@pytest.mark.parametrize("lines", [[], ["", "   "]])
def test_empty_corpus(tmp_path, lines):
    error = error_of(make_beir(tmp_path, corpus_lines=lines))
    assert "empty corpus" in str(error) and error.path.endswith("corpus.jsonl")


def test_all_lines_bad_is_empty_corpus_even_when_skipping(tmp_path):
    root = make_beir(tmp_path, corpus_lines=["{", "{"])
    with pytest.raises(InputError, match="empty corpus.*every line was bad"):
        list(beir(root, skip=True).documents())


def test_ten_megabyte_document_streams(tmp_path):
    big = "word " * (2 << 20)  # 10 MiB of text on one line
    root = make_beir(tmp_path, docs=[DOCS[0], {"_id": "big", "text": big}, DOCS[1]])
    docs = list(beir(root).documents())
    assert [d.id for d in docs] == ["d1", "big", "d2"] and len(docs[1].text) == len(big)


def test_missing_parts(tmp_path):
    assert "dataset path not found" in str(error_of(tmp_path / "nowhere"))
    root = make_beir(tmp_path / "x")
    (root / "qrels" / "test.tsv").rename(root / "qrels" / "dev.tsv")
    error = error_of(root)
    assert error.path == str(root / "qrels" / "test.tsv") and "available splits: dev" in str(error)
    assert beir(root, split="dev").qrels is not None
    (root / "queries.jsonl").unlink()
    assert "queries file not found" in str(error_of(root, split="dev"))
    (root / "corpus.jsonl").unlink()
    assert "corpus file not found" in str(error_of(root))


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ("q2\td1\thigh", "grade 'high' is not an integer"),
        ("q2\td1\t1.5", "grade '1.5' is not an integer"),
        ("q2\td1", "expected 3 tab-separated fields"),
        ("q1\td1\t2", "duplicate judgement for query 'q1', document 'd1'"),
        ("q9\td2\t1", "query id 'q9' is not in"),
    ],
)
def test_bad_qrels_line(tmp_path, bad_line, problem):
    root = make_beir(tmp_path, qrels=f"query-id\tcorpus-id\tscore\nq1\td1\t1\n{bad_line}\nq2\td2\t1\n")
    error = error_of(root)
    assert (error.path, error.line) == (str(root / "qrels" / "test.tsv"), 3) and problem in str(error)
    dataset = beir(root, skip=True)
    assert dataset.skipped.counts == {"qrels": 1}
    assert [q.id for q in dataset.queries] == ["q1", "q2"]


def test_empty_qrels_and_unmatched_queries(tmp_path):
    assert "no judgements" in str(error_of(make_beir(tmp_path / "a", qrels="query-id\tcorpus-id\tscore\n")))
    error = error_of(make_beir(tmp_path / "b", qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\n",
                               queries=[{"_id": "q1 x", "text": "bad id"}]), )
    assert error.line == 1 and "whitespace" in str(error)


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"_id": "q1"}', "missing field 'text' or 'query'"),
        ('{"_id": "q1", "text": "  "}', "query text is empty"),
        ('{"_id": "q1", "text": "again"}', "duplicate query id 'q1' (first seen at line 1)"),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_queries_line(tmp_path, line, problem):
    root = make_beir(tmp_path)
    with open(root / "queries.jsonl", "a") as fh:
        fh.write(line + "\n")
    error = error_of(root)
    assert (error.path, error.line) == (str(root / "queries.jsonl"), 4) and problem in str(error)
    assert beir(root, skip=True).skipped.counts == {"queries": 1}


def test_empty_queries_file(tmp_path):
    root = make_beir(tmp_path, queries=[])
    assert "no queries" in str(error_of(root))


def test_qrels_helpers(tmp_path):
    tsv = tmp_path / "q.tsv"
    tsv.write_text(QRELS)
    assert read_qrels_tsv(tsv).to_dict() == {"q1": {"d1": 1}, "q2": {"d2": 2, "d1": 0}}
    headerless = tmp_path / "h.tsv"
    headerless.write_text("q1\td1\t1\n")
    assert read_qrels_tsv(headerless).to_dict() == {"q1": {"d1": 1}}
    trec = tmp_path / "q.txt"
    trec.write_text("q1 0 d1 1\nq1 0 d2 0\n\nq2 Q0 d3 -1\n")
    assert read_qrels_trec(trec).to_dict() == {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": -1}}
    trec.write_text("q1 0 d1 1\nq1 0 d2\n")
    with pytest.raises(InputError, match=r"q\.txt:2: expected 4 fields"):
        read_qrels_trec(trec)
    assert read_qrels_trec(trec, skip_bad_lines=True).to_dict() == {"q1": {"d1": 1}}
    with pytest.raises(InputError, match="qrels file not found"):
        read_qrels_tsv(tmp_path / "missing.tsv")
