"""A query log to warm the KV cache from: the questions users asked, without ids or judgements.

JSON Lines (`.jsonl`, `.jsonl.gz`: a `text` or `query` field per line, e.g. a BEIR queries file)
or plain text (any other file: one question per non-blank line).
"""

from __future__ import annotations

from pathlib import Path

from ragkit.errors import InputError
from ragkit.readers.lines import BadLines, iter_jsonl, iter_text_lines
from ragkit.readers.records import record_text


def read_query_log(path: Path) -> list[str]:
    bad = BadLines()
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        texts = [record_text(record, ("text", "query"), path, line) for line, record in iter_jsonl(path, "queries", bad)]
    else:
        texts = [text.strip() for _line, text in iter_text_lines(path, "queries", bad)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(path, "no queries in the query log")
    return texts
