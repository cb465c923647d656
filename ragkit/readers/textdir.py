"""Plain-text folders: one document per .txt file, id = path relative to the folder.

Files are read in sorted path order so ids, chunks and fingerprints are reproducible.
Optional queries.jsonl and qrels/<split>.tsv in the folder are read as for BEIR.
"""

from __future__ import annotations

from pathlib import Path

from ragkit.errors import InputError
from ragkit.readers.beir import read_sidecars
from ragkit.readers.dataset import Dataset
from ragkit.readers.lines import BadLines, files_fingerprint
from ragkit.readers.records import stream_documents
from ragkit.types import Document


def _read_text(path: Path, root: Path) -> Document:
    doc_id = path.relative_to(root).as_posix()
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(path, f"not valid UTF-8 (byte 0x{data[exc.start]:02x})", line,
                         hint="re-encode the file as UTF-8, or pass --skip-bad-lines") from None
    if not text.strip():
        raise InputError(path, "empty file", hint="delete it, or pass --skip-bad-lines")
    if any(ch.isspace() for ch in doc_id):
        raise InputError(path, "file name contains whitespace, which would break TREC run files",
                         hint="rename the file, or pass --skip-bad-lines")
    return Document(id=doc_id, text=text)


def open_textdir(path: Path, split: str, bad: BadLines, limit: int) -> Dataset:
    if not path.is_dir():
        raise InputError(path, "dataset folder not found", hint="set [dataset] path to a folder of .txt files")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    queries, qrels, dropped = read_sidecars(path, split, bad, limit, require=False)

    def records():
        return ((p, 1, p) for p in files)

    def documents():
        return stream_documents(records, lambda p, _where, _line: _read_text(p, path), bad, path)

    return Dataset(name=path.name, documents=documents, queries=queries, qrels=qrels,
                   fingerprint=files_fingerprint(files, root=path), skipped=bad, dropped_queries=dropped)
