"""The bundled data sets read cleanly and have the sizes data/README.md states."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ragkit.config import DatasetConfig
from ragkit.readers import open_dataset, read_musique

DATA = Path(__file__).resolve().parent.parent / "data"


def counts(fmt: str, path: Path, **cfg) -> tuple[int, int, int]:
    dataset = open_dataset(DatasetConfig(format=fmt, **cfg), path)
    judgements = sum(len(docs) for docs in dataset.qrels.values())
    doc_ids = {doc.id for doc in dataset.documents()}
    assert all(set(docs) <= doc_ids for docs in dataset.qrels.values()), "qrels name a document the corpus lacks"
    return len(doc_ids), len(dataset.queries), judgements


def test_scifact():
    assert counts("beir", DATA / "scifact") == (5183, 300, 339)


@pytest.mark.parametrize("split", ["test", "dev"])
def test_cosqa(split):
    assert counts("beir", DATA / "cosqa", split=split) == (6267, 500, 500)
    assert counts("coir", DATA / "cosqa", split=split, task="cosqa", title=False) == (6267, 500, 500)


@pytest.mark.parametrize("domain, expected", [("biology", (27, 5, 22)), ("leetcode", (25, 5, 9)),
                                              ("theoremqa_theorems", (11, 5, 7))])
def test_bright_fixture(domain, expected):
    assert counts("bright", DATA / "bright", domain=domain) == expected


def test_bright_fixture_long_documents():
    assert counts("bright", DATA / "bright", domain="biology", long_documents=True) == (13, 5, 8)


def test_musique_sample():
    samples = read_musique(DATA / "musique" / "musique_s.json.gz")
    assert len(samples) == 150 and all(len(s["ctxs"]) == 10 and len(s["answers"]) == 1 for s in samples)


def test_bundle_stays_small():
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 25_000_000


def test_cosqa_converter(tmp_path):
    """The committed converter on a two-function source gives the BEIR files it documents."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_cosqa", DATA.parent / "scripts" / "convert_cosqa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = tmp_path / "src"
    source.mkdir()
    (source / "code_idx_map.txt").write_text(json.dumps({"def b(): pass": 1, "def a(): pass": 0}))
    for split, name in module.SPLITS.items():
        (source / name).write_text(json.dumps([{"idx": f"{split}-1", "doc": "make a", "code": "def a(): pass",
                                                "retrieval_idx": 0}]))
    module.convert(source, tmp_path / "out")
    corpus = gzip.decompress((tmp_path / "out" / "corpus.jsonl.gz").read_bytes()).decode().splitlines()
    assert [json.loads(line) for line in corpus] == [{"_id": "0", "title": "", "text": "def a(): pass"},
                                                     {"_id": "1", "title": "", "text": "def b(): pass"}]
    assert (tmp_path / "out" / "qrels" / "dev.tsv").read_text() == "query-id\tcorpus-id\tscore\ndev-1\t0\t1\n"
    dataset = open_dataset(DatasetConfig(format="beir"), tmp_path / "out")
    assert [q.id for q in dataset.queries] == ["test-1"] and dataset.dropped_queries == 1
