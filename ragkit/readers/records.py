"""Turn one parsed record (a JSON line or a Hugging Face row) into a Document or Query.

Every format funnels through here, so ids, fields and duplicates are checked the same way
whichever file or hub dataset they came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from ragkit.errors import InputError
from ragkit.readers.lines import SKIP_HINT, BadLines
from ragkit.types import Document, Query

# A record source yields (where, line or row number, record); `where` names the file or hub split.
Records = Iterable[tuple[str | Path, int, Mapping[str, Any]]]


def _pick(record: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if key in record:
            return key, record[key]
    return None, None


def record_id(record: Mapping[str, Any], keys: tuple[str, ...], where: str | Path, line: int) -> str:
    """The record's id as a string; ints are accepted (some corpora store numeric ids)."""
    key, value = _pick(record, keys)
    if key is None:
        raise InputError(where, f"missing id field ({' or '.join(repr(k) for k in keys)})", line, hint=SKIP_HINT)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(where, f"field {key!r} must be a string, got {type(value).__name__}", line, hint=SKIP_HINT)
    value = str(value)
    if not value or any(ch.isspace() for ch in value):
        raise InputError(where, f"id {value!r} is empty or contains whitespace, which would break TREC run files",
                         line, hint=SKIP_HINT)
    return value


def record_text(record: Mapping[str, Any], keys: tuple[str, ...], where: str | Path, line: int,
                optional: bool = False) -> str:
    key, value = _pick(record, keys)
    if key is None or (optional and value is None):
        if optional:
            return ""
        raise InputError(where, f"missing field {' or '.join(repr(k) for k in keys)}", line, hint=SKIP_HINT)
    if not isinstance(value, str):
        raise InputError(where, f"field {key!r} must be a string, got {type(value).__name__}", line, hint=SKIP_HINT)
    return value


def record_metadata(record: Mapping[str, Any], where: str | Path, line: int) -> Mapping[str, Any]:
    value = record.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputError(where, f"field 'metadata' must be an object, got {type(value).__name__}", line,
                         hint=SKIP_HINT)
    return dict(value)


def document_from(record: Mapping[str, Any], where: str | Path, line: int,
                  id_keys: tuple[str, ...] = ("_id", "id"), text_keys: tuple[str, ...] = ("text", "contents"),
                  ) -> Document:
    return Document(
        id=record_id(record, id_keys, where, line),
        text=record_text(record, text_keys, where, line),
        title=record_text(record, ("title",), where, line, optional=True),
        metadata=record_metadata(record, where, line),
    )


def gold_answers(value: Any, key: str, where: str | Path, line: int) -> tuple[str, ...]:
    """Gold answers as given: a list of strings or one string (a yes/no/maybe label is one string)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(where, f"field {key!r} must be a string or a list of strings, got {value!r:.60}", line,
                         hint=SKIP_HINT)
    return tuple(v for v in value if v.strip())


def answer_choices(value: Any, key: str, where: str | Path, line: int) -> tuple[str, ...]:
    """A query's closed-form choices: absent, or a non-empty list of strings each with text."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(where, f"field {key!r} must be a list of strings, got {value!r:.60}", line, hint=SKIP_HINT)
    if not value:
        raise InputError(where, f"field {key!r} is an empty choice list", line,
                         hint="give the choices, e.g. [\"yes\", \"no\"], or drop the field")
    for n, choice in enumerate(value):
        if not choice.strip():
            raise InputError(where, f"field {key!r}: choice {n} ({choice!r}) is empty", line, hint=SKIP_HINT)
    return tuple(value)


def query_from(record: Mapping[str, Any], where: str | Path, line: int) -> Query:
    """A query; gold answers come from its `answers` field, else from `metadata.answers`, and closed-form
    choices likewise from `choices` / `metadata.choices`."""
    text = record_text(record, ("text", "query"), where, line)
    if not text.strip():
        raise InputError(where, "query text is empty", line, hint=SKIP_HINT)
    metadata = record_metadata(record, where, line)
    key = "answers" if "answers" in record else "metadata.answers"
    answers = record["answers"] if "answers" in record else metadata.get("answers")
    choices_key = "choices" if "choices" in record else "metadata.choices"
    choices = record["choices"] if "choices" in record else metadata.get("choices")
    return Query(id=record_id(record, ("_id", "id"), where, line), text=text,
                 answers=gold_answers(answers, key, where, line), metadata=metadata,
                 choices=answer_choices(choices, choices_key, where, line))


def stream_documents(records: Callable[[], Records], convert: Callable[..., Document], bad: BadLines,
                     corpus_name: str | Path) -> Iterator[Document]:
    """Convert and check records one by one; a duplicate id names both lines; nothing at all is an error."""
    bad.restart("corpus")
    first_line: dict[str, int] = {}
    for where, line, record in records():
        try:
            doc = convert(record, where, line)
        except InputError as error:
            bad.report("corpus", error)
            continue
        if doc.id in first_line:
            bad.report("corpus", InputError(where, f"duplicate document id {doc.id!r} (first seen at line "
                                                   f"{first_line[doc.id]})", line, hint=SKIP_HINT))
            continue
        first_line[doc.id] = line
        yield doc
    if not first_line:
        raise InputError(corpus_name, "empty corpus: no documents were read",
                         hint="check the path and format in [dataset]" + (
                             "; every line was bad and skipped" if bad.counts.get("corpus") else ""))


def collect_queries(records: Records, convert: Callable[..., Query], bad: BadLines) -> dict[str, Query]:
    """All queries of a file in file order, keyed by id; duplicates are bad lines."""
    queries: dict[str, Query] = {}
    lines: dict[str, int] = {}
    for where, line, record in records:
        try:
            query = convert(record, where, line)
        except InputError as error:
            bad.report("queries", error)
            continue
        if query.id in queries:
            bad.report("queries", InputError(where, f"duplicate query id {query.id!r} (first seen at line "
                                                    f"{lines[query.id]})", line, hint=SKIP_HINT))
            continue
        queries[query.id] = query
        lines[query.id] = line
    return queries
