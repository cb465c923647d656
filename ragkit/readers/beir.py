"""BEIR folders: corpus.jsonl[.gz], queries.jsonl[.gz], qrels/<split>.tsv.

Same selection as BEIR's GenericDataLoader: only queries judged in the split are kept.
JSON Lines corpora and plain-text folders reuse the sidecar queries/qrels reading here.
"""

from __future__ import annotations

from pathlib import Path

from ragkit.errors import InputError
from ragkit.readers.dataset import Dataset, pair_queries
from ragkit.readers.lines import BadLines, files_fingerprint, find_jsonl, iter_jsonl
from ragkit.readers.qrels import collect_qrels, iter_qrels_tsv
from ragkit.readers.records import collect_queries, document_from, query_from, stream_documents


def _require_folder(path: Path) -> None:
    if not path.is_dir():
        raise InputError(path, "dataset folder not found", hint="set [dataset] path to a folder")


def _jsonl_records(path: Path, part: str, bad: BadLines):
    return ((path, line, record) for line, record in iter_jsonl(path, part, bad))


def read_sidecars(folder: Path, split: str, bad: BadLines, limit: int, require: bool):
    """queries.jsonl and qrels/<split>.tsv of a folder -> (queries, qrels, dropped)."""
    queries_path = find_jsonl(folder, "queries")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if queries_path is None:
        if require:
            raise InputError(folder / "queries.jsonl", "queries file not found")
        return [], None, 0
    queries = collect_queries(_jsonl_records(queries_path, "queries", bad), query_from, bad)
    if not queries:
        raise InputError(queries_path, "no queries in the file")
    if not qrels_path.is_file():
        if require:
            splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
            raise InputError(qrels_path, f"qrels file for split {split!r} not found",
                             hint=f"available splits: {', '.join(splits)}" if splits else "add qrels/<split>.tsv")
        return pair_queries(queries, None, {}, bad, limit, queries_path)
    judgements, first = collect_qrels(iter_qrels_tsv(qrels_path, bad), bad)
    if not judgements:
        raise InputError(qrels_path, "no judgements in the qrels file")
    return pair_queries(queries, judgements, first, bad, limit, queries_path)


def corpus_dataset(name: str, corpus_path: Path, folder: Path, split: str, bad: BadLines, limit: int,
                   require_qrels: bool) -> Dataset:
    queries, qrels, dropped = read_sidecars(folder, split, bad, limit, require_qrels)

    def documents():
        return stream_documents(lambda: _jsonl_records(corpus_path, "corpus", bad), document_from, bad, corpus_path)

    return Dataset(name=name, documents=documents, queries=queries, qrels=qrels,
                   fingerprint=files_fingerprint([corpus_path]), skipped=bad, dropped_queries=dropped)


def open_beir(path: Path, split: str, bad: BadLines, limit: int) -> Dataset:
    _require_folder(path)
    corpus_path = find_jsonl(path, "corpus")
    if corpus_path is None:
        raise InputError(path / "corpus.jsonl", "corpus file not found (looked for corpus.jsonl and corpus.jsonl.gz)")
    return corpus_dataset(path.name, corpus_path, path, split, bad, limit, require_qrels=True)


def open_jsonl(path: Path, split: str, bad: BadLines, limit: int) -> Dataset:
    """A .jsonl[.gz] corpus file, or a folder with corpus.jsonl[.gz]; queries/qrels beside it are optional."""
    if path.is_file():
        return corpus_dataset(path.name.split(".")[0], path, path.parent, split, bad, limit, require_qrels=False)
    _require_folder(path)
    corpus_path = find_jsonl(path, "corpus")
    if corpus_path is None:
        raise InputError(path / "corpus.jsonl", "corpus file not found (looked for corpus.jsonl and corpus.jsonl.gz)")
    return corpus_dataset(path.name, corpus_path, path, split, bad, limit, require_qrels=False)
