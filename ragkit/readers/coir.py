"""CoIR code-retrieval tasks: a local BEIR folder, or the hub pair
`<org>/<task>-queries-corpus` (splits `corpus`, `queries`) and `<org>/<task>-qrels` (split = cfg.split).

As in CoIR's own loader, only queries judged in the split are kept. Titles stay on the
documents; `open_dataset` drops them when `title = false` (coir configs), as CoIR indexes text only.
"""

from __future__ import annotations

from pathlib import Path

from ragkit.errors import InputError
from ragkit.readers.beir import open_beir
from ragkit.readers.dataset import Dataset, pair_queries
from ragkit.readers.hub import HubSplit
from ragkit.readers.lines import SKIP_HINT, BadLines
from ragkit.readers.qrels import collect_qrels
from ragkit.readers.records import collect_queries, document_from, query_from, stream_documents

QUERIES_CORPUS = "-queries-corpus"


def _hub_qrel_rows(qrels: HubSplit, bad: BadLines):
    for where, row_no, row in qrels.records():
        try:
            qid, did, grade = str(row["query-id"]), str(row["corpus-id"]), row["score"]
        except KeyError as exc:
            bad.report("qrels", InputError(where, f"missing field {exc.args[0]!r}", row_no, hint=SKIP_HINT))
            continue
        if isinstance(grade, bool) or not isinstance(grade, int):
            bad.report("qrels", InputError(where, f"relevance grade {grade!r} is not an integer", row_no,
                                           hint=SKIP_HINT))
            continue
        yield where, row_no, qid, did, grade


def open_coir(path: Path, hub_repo: str | None, task: str, split: str, bad: BadLines, limit: int) -> Dataset:
    if path.is_dir():
        dataset = open_beir(path, split, bad, limit)
        dataset.name = f"coir-{task}" if task else dataset.name
        return dataset
    if hub_repo is None:
        raise InputError(path, "CoIR dataset not found",
                         hint="point [dataset] path to a local BEIR folder or a hub org such as CoIR-Retrieval")
    if hub_repo.endswith(QUERIES_CORPUS):
        base = hub_repo.removesuffix(QUERIES_CORPUS)
    elif task:
        base = f"{hub_repo}/{task}"
    else:
        raise InputError(hub_repo, "CoIR needs a task", hint="set [dataset] task, e.g. cosqa")
    corpus = HubSplit(base + QUERIES_CORPUS, None, "corpus")
    queries_split = HubSplit(base + QUERIES_CORPUS, None, "queries")
    qrels_split = HubSplit(base + "-qrels", None, split)

    queries = collect_queries(queries_split.records(), query_from, bad)
    if not queries:
        raise InputError(queries_split.where, "no queries")
    judgements, first = collect_qrels(_hub_qrel_rows(qrels_split, bad), bad)
    if not judgements:
        raise InputError(qrels_split.where, "no judgements")
    kept, qrels, dropped = pair_queries(queries, judgements, first, bad, limit, queries_split.where)

    def documents():
        return stream_documents(corpus.records, document_from, bad, corpus.where)

    return Dataset(name=f"coir-{base.rsplit('/', 1)[-1]}", documents=documents, queries=kept, qrels=qrels,
                   fingerprint=corpus.fingerprint, skipped=bad, dropped_queries=dropped)
