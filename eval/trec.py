"""TREC run files (`qid Q0 docid rank score tag`), read with line-exact errors."""

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
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(path, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                                 line=line_no, hint="re-encode the run file as UTF-8") from None
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


def drop_unjudged(path: str | Path, run: Run, qrels: Qrels, skip: bool = False) -> tuple[Run, list[str]]:
    """The run without queries the qrels do not judge, and their ids.

    Such a query usually means the run and qrels belong to different splits or datasets, so
    by default it is an InputError naming the run file's line; with `skip` it is left out
    and returned, so that the caller can say how many were skipped.
    """
    unjudged = sorted(q for q in run if not qrels.get(q))
    if unjudged and not skip:
        first = unjudged[0]
        line_no = None
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.split()[:1] == [first]:
                    line_no = number
                    break
        raise InputError(path, f"query {first!r} is not in the qrels ({len(unjudged)} such queries)", line=line_no,
                         hint="check the run and qrels are for the same split, or pass --skip-unjudged")
    skipped = set(unjudged)
    return Run({q: hits for q, hits in run.items() if q not in skipped}, name=run.name), unjudged
