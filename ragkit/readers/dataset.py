"""The Dataset value every reader returns, and the query/qrels pairing rules they all share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ragkit.errors import InputError
from ragkit.readers.lines import SKIP_HINT, BadLines
from ragkit.types import Document, Qrels, Query


@dataclass
class Dataset:
    """A corpus stream plus the queries and judgements to score against it.

    `documents()` starts a fresh pass each call and checks records as it goes, so a bad line
    surfaces while indexing, with its file and line. `skipped` counts what --skip-bad-lines
    left out; `dropped_queries` counts queries without judgements in the split, which are
    left out as BEIR's loader does.
    """

    name: str
    documents: Callable[[], Iterator[Document]]
    queries: list[Query]
    qrels: Qrels | None
    fingerprint: str
    skipped: BadLines = field(default_factory=BadLines)
    dropped_queries: int = 0


def pair_queries(queries: dict[str, Query], judgements: dict[str, dict[str, int]] | None,
                 first_line: dict[str, tuple], bad: BadLines, limit: int,
                 queries_where: str | Path) -> tuple[list[Query], Qrels | None, int]:
    """Keep the queries that have judgements (file order), at most `limit` of them (0 = all).

    A judgement for a query id that the queries file lacks is a bad qrels line: it would
    otherwise count as a silently missed query or vanish, depending on the scorer.
    """
    if judgements is None:
        kept = list(queries.values())
        return (kept[:limit] if limit else kept), None, 0
    for qid in [q for q in judgements if q not in queries]:
        where, line = first_line[qid]
        bad.report("qrels", InputError(where, f"query id {qid!r} is not in {queries_where}", line, hint=SKIP_HINT))
        del judgements[qid]
    kept = [q for q in queries.values() if q.id in judgements]
    dropped = len(queries) - len(kept)
    if not kept:
        raise InputError(queries_where, "no query has judgements in this split",
                         hint="check that the qrels and queries files use the same query ids")
    if limit:
        kept = kept[:limit]
    return kept, Qrels({q.id: judgements[q.id] for q in kept}), dropped
