"""TREC run files and qrels files (TREC 4-column or BEIR TSV), read with line-exact errors."""

from __future__ import annotations

import math
from pathlib import Path

from ragkit.errors import InputError
from ragkit.types import Hit, Qrels, Run


def read_trec_run(path: str | Path) -> Run:
    """Read `qid Q0 docid rank score tag` lines. The rank column gives the order.

    A document listed twice for one query is an error: trec_eval would count it twice.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "run file not found")
    rankings: dict[str, list[Hit]] = {}
    seen: dict[str, set[str]] = {}
    tag = "ragkit"
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 6:
                raise InputError(path, f"expected 6 columns 'qid Q0 docid rank score tag', got {len(parts)}",
                                 line=line_no)
            qid, _q0, doc_id, rank_text, score_text, tag = parts
            try:
                rank = int(rank_text)
                score = float(score_text)
            except ValueError:
                raise InputError(path, f"rank must be an integer and score a number, got {rank_text!r} "
                                 f"and {score_text!r}", line=line_no) from None
            if not math.isfinite(score):
                raise InputError(path, f"score is not finite: {score_text!r}", line=line_no)
            if doc_id in seen.setdefault(qid, set()):
                raise InputError(path, f"document {doc_id!r} listed twice for query {qid!r}", line=line_no)
            seen[qid].add(doc_id)
            rankings.setdefault(qid, []).append(Hit(doc_id, score, rank))
    for hits in rankings.values():
        hits.sort(key=lambda h: (h.rank, -h.score, h.id))
    return Run(rankings, name=tag)


def write_trec_run(path: str | Path, run: Run) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(run.to_trec_lines())


def read_qrels(path: str | Path) -> Qrels:
    """Read TREC qrels (`qid iter docid grade`) or BEIR TSV (`query-id corpus-id score`, header row).

    Grades must be integers; a bad line raises InputError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "qrels file not found")
    judgements: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if line_no == 1 and parts[0].lower() in ("query-id", "query_id", "qid"):
                continue
            if len(parts) == 4:
                qid, _iteration, doc_id, grade_text = parts
            elif len(parts) == 3:
                qid, doc_id, grade_text = parts
            else:
                raise InputError(path, f"expected 'qid 0 docid grade' or 'query-id corpus-id score', "
                                 f"got {len(parts)} columns", line=line_no)
            try:
                grade = int(grade_text)
            except ValueError:
                raise InputError(path, f"relevance grade must be an integer, got {grade_text!r}",
                                 line=line_no) from None
            judgements.setdefault(qid, {})[doc_id] = grade
    if not judgements:
        raise InputError(path, "no judgements in qrels file")
    return Qrels(judgements)
