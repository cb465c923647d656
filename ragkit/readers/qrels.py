"""Relevance judgements: BEIR TSV (`query-id corpus-id score`, with header) and TREC (`qid 0 docid grade`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from ragkit.errors import InputError
from ragkit.readers.lines import SKIP_HINT, BadLines, iter_text_lines
from ragkit.types import Qrels

# (where, line, query id, doc id, grade)
QrelRow = tuple[str | Path, int, str, str, int]


def _grade(value: str, path: Path, line: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(path, f"relevance grade {value!r} is not an integer", line, hint=SKIP_HINT) from None


def iter_qrels_tsv(path: Path, bad: BadLines) -> Iterator[QrelRow]:
    """BEIR qrels: tab-separated query-id, corpus-id, score; a first line whose score is not a number is the header."""
    for line, text in iter_text_lines(path, "qrels", bad):
        fields = text.rstrip("\r\n").split("\t")
        if line == 1 and len(fields) == 3 and not fields[2].strip().lstrip("-").isdigit():
            continue
        if len(fields) != 3:
            bad.report("qrels", InputError(path, f"expected 3 tab-separated fields (query-id, corpus-id, score), "
                                                 f"got {len(fields)}", line, hint=SKIP_HINT))
            continue
        qid, did, grade = (f.strip() for f in fields)
        try:
            yield path, line, qid, did, _grade(grade, path, line)
        except InputError as error:
            bad.report("qrels", error)


def iter_qrels_trec(path: Path, bad: BadLines) -> Iterator[QrelRow]:
    """TREC qrels: whitespace-separated query id, iteration (ignored), doc id, grade."""
    for line, text in iter_text_lines(path, "qrels", bad):
        fields = text.split()
        if len(fields) != 4:
            bad.report("qrels", InputError(path, f"expected 4 fields (qid iter docid grade), got {len(fields)}",
                                           line, hint=SKIP_HINT))
            continue
        try:
            yield path, line, fields[0], fields[2], _grade(fields[3], path, line)
        except InputError as error:
            bad.report("qrels", error)


def collect_qrels(rows: Iterable[QrelRow], bad: BadLines) -> tuple[dict[str, dict[str, int]], dict[str, tuple]]:
    """Judgements per query, and where each query's first judgement is (for later error messages).

    A repeated (query, document) pair is a bad line: with two grades there is no right one.
    """
    judgements: dict[str, dict[str, int]] = {}
    first: dict[str, tuple] = {}
    for where, line, qid, did, grade in rows:
        docs = judgements.setdefault(qid, {})
        if did in docs:
            bad.report("qrels", InputError(where, f"duplicate judgement for query {qid!r}, document {did!r}", line,
                                           hint=SKIP_HINT))
            continue
        docs[did] = grade
        first.setdefault(qid, (where, line))
    return judgements, first


def _read(path: str | Path, rows, skip_bad_lines: bool) -> Qrels:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "qrels file not found")
    bad = BadLines(skip_bad_lines)
    judgements, _ = collect_qrels(rows(path, bad), bad)
    if not judgements:
        raise InputError(path, "no judgements in the qrels file")
    return Qrels(judgements)


def read_qrels_tsv(path: str | Path, skip_bad_lines: bool = False) -> Qrels:
    return _read(path, iter_qrels_tsv, skip_bad_lines)


def read_qrels_trec(path: str | Path, skip_bad_lines: bool = False) -> Qrels:
    return _read(path, iter_qrels_trec, skip_bad_lines)
