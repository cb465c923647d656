"""BRIGHT: queries from the `examples` config, corpus from `documents` or `long_documents`, split = domain.

Local copies use the same records as the hub, one JSON Lines file per config and domain:
`<folder>/examples/<domain>.jsonl[.gz]`, `<folder>/documents/<domain>.jsonl[.gz]`,
`<folder>/long_documents/<domain>.jsonl[.gz]`. Any other folder or a hub id
(`xlangai/BRIGHT`) goes through `datasets`. Qrels are binary, from `gold_ids`
(`gold_ids_long` with long documents); `excluded_ids` ("N/A" = none) travel on the Query
for the BRIGHT protocol to drop from rankings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ragkit.errors import InputError
from ragkit.readers.dataset import Dataset, pair_queries
from ragkit.readers.hub import HubSplit
from ragkit.readers.lines import SKIP_HINT, BadLines, files_fingerprint, find_jsonl, iter_jsonl
from ragkit.readers.records import collect_queries, document_from, record_id, record_text, stream_documents
from ragkit.types import Query

NOT_AVAILABLE = "N/A"


def _id_list(record: Mapping[str, Any], key: str, where: str | Path, line: int) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(where, f"field {key!r} must be a list of strings", line, hint=SKIP_HINT)
    return [v for v in value if v != NOT_AVAILABLE]


def example_to_query(record: Mapping[str, Any], where: str | Path, line: int) -> Query:
    answer = record.get("gold_answer")
    return Query(
        id=record_id(record, ("id",), where, line),
        text=record_text(record, ("query",), where, line),
        excluded_ids=frozenset(_id_list(record, "excluded_ids", where, line)),
        answers=(answer,) if isinstance(answer, str) and answer.strip() and answer != NOT_AVAILABLE else (),
        metadata={"gold_ids": _id_list(record, "gold_ids", where, line),
                  "gold_ids_long": _id_list(record, "gold_ids_long", where, line)},
    )


def _bright_document(record, where, line):
    return document_from(record, where, line, id_keys=("id",), text_keys=("content",))


def open_bright(path: Path, hub_repo: str | None, domain: str, long_documents: bool, bad: BadLines,
                limit: int) -> Dataset:
    if not domain:
        raise InputError(path, "BRIGHT needs a domain", hint="set [dataset] domain, e.g. biology")
    domain = domain.replace("-", "_")
    corpus_config = "long_documents" if long_documents else "documents"
    name = f"bright-{domain}" + ("-long" if long_documents else "")
    local_files = (path / "examples").glob("*.jsonl*") if path.is_dir() else []
    local_domains = sorted({p.name.split(".")[0] for p in local_files})
    examples_path = find_jsonl(path / "examples", domain) if local_domains else None
    if local_domains and examples_path is None:
        raise InputError(path / "examples" / f"{domain}.jsonl", f"no BRIGHT examples for domain {domain!r}",
                         hint=f"domains here: {', '.join(local_domains)}")

    if examples_path is not None:
        example_records = ((examples_path, line, r) for line, r in iter_jsonl(examples_path, "queries", bad))
        queries_where = examples_path
    else:
        repo = str(path) if path.is_dir() else hub_repo
        if repo is None:
            raise InputError(path, f"no BRIGHT examples for domain {domain!r} here",
                             hint=f"expected examples/{domain}.jsonl in a local folder, "
                                  "or a hub id like xlangai/BRIGHT")
        examples = HubSplit(repo, "examples", domain)
        example_records, queries_where = examples.records(), examples.where

    queries = collect_queries(example_records, example_to_query, bad)
    if not queries:
        raise InputError(queries_where, "no queries in the file")
    gold_key = "gold_ids_long" if long_documents else "gold_ids"
    judgements = {q.id: {doc_id: 1 for doc_id in q.metadata[gold_key]} for q in queries.values()
                  if q.metadata[gold_key]}
    if not judgements and long_documents:
        raise InputError(queries_where, f"no query of domain {domain!r} has gold_ids_long",
                         hint="BRIGHT has long documents only for the StackExchange domains and pony; "
                              "set [dataset] long_documents = false")
    kept, qrels, dropped = pair_queries(queries, judgements, {}, bad, limit, queries_where)

    if examples_path is not None:
        corpus_path = find_jsonl(path / corpus_config, domain)
        if corpus_path is None:
            raise InputError(path / corpus_config / f"{domain}.jsonl", f"BRIGHT {corpus_config} file not found")

        def corpus_records():
            return ((corpus_path, line, r) for line, r in iter_jsonl(corpus_path, "corpus", bad))

        corpus_name, fingerprint = corpus_path, files_fingerprint([corpus_path])
    else:
        corpus = HubSplit(repo, corpus_config, domain)
        corpus_records, corpus_name, fingerprint = corpus.records, corpus.where, corpus.fingerprint

    def documents():
        return stream_documents(corpus_records, _bright_document, bad, corpus_name)

    return Dataset(name=name, documents=documents, queries=kept, qrels=qrels, fingerprint=fingerprint,
                   skipped=bad, dropped_queries=dropped)
