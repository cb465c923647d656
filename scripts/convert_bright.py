"""Build data/bright/: real BRIGHT queries for a few domains plus hand-made fixture documents.

    python scripts/convert_bright.py ../shared/data/bright data/bright

examples/<domain>.jsonl: the first QUERIES lines of anserini-tools' BRIGHT topics file for the
domain, copied byte for byte (the HF `examples` record layout). The BRIGHT corpora are not
available here, so documents/<domain>.jsonl and (for domains with a long-document setting)
long_documents/<domain>.jsonl are FIXTURES
in the HF `documents` layout ({id, content}): one stand-in per gold id and per (at most
EXCLUDED_PER_QUERY) excluded id, whose content repeats the start of its query so that a
retriever ranks it high, plus DISTRACTORS unrelated stand-ins. They exercise loading, qrels
and excluded-id handling; scores on them mean nothing about BRIGHT.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DOMAINS = {"biology": "biology", "leetcode": "leetcode", "theoremqa_theorems": "theoremqa-theorems"}
QUERIES = 5
EXCLUDED_PER_QUERY = 3
DISTRACTORS = 5
FILLER = ["Tide pools host anemones and crabs.", "Sourdough needs a lively starter.",
          "Railway gauges differ between countries.", "Violins are tuned in fifths.",
          "Glaciers carve U-shaped valleys."]


def _fixture_docs(domain: str, examples: list[dict], gold_key: str) -> list[dict]:
    docs: dict[str, str] = {}
    for example in examples:
        lead = " ".join(example["query"].split())[:200]
        excluded = [e for e in example["excluded_ids"] if e != "N/A"][:EXCLUDED_PER_QUERY]
        for doc_id in (d for d in example[gold_key] if d != "N/A"):
            docs.setdefault(doc_id, f"Fixture stand-in for BRIGHT {domain} document {doc_id}, gold for query "
                                    f"{example['id']}: {lead}")
        for doc_id in excluded:
            docs.setdefault(doc_id, f"Fixture stand-in for BRIGHT {domain} document {doc_id}, excluded for query "
                                    f"{example['id']}: {lead}")
    for n, text in enumerate(FILLER[:DISTRACTORS]):
        docs[f"fixture_distractor_{n}.txt"] = f"Fixture distractor for BRIGHT {domain}: {text}"
    return [{"id": doc_id, "content": content} for doc_id, content in docs.items()]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def convert(source: Path, target: Path) -> dict[str, dict[str, int]]:
    counts = {}
    for domain, file_domain in DOMAINS.items():
        with open(source / "examples" / f"topics.bright-{file_domain}-original.jsonl", "rb") as fh:
            lines = [fh.readline() for _ in range(QUERIES)]
        (target / "examples").mkdir(parents=True, exist_ok=True)
        (target / "examples" / f"{domain}.jsonl").write_bytes(b"".join(lines))
        examples = [json.loads(line) for line in lines]
        documents = _fixture_docs(domain, examples, "gold_ids")
        _write_jsonl(target / "documents" / f"{domain}.jsonl", documents)
        counts[domain] = {"queries": len(examples), "documents": len(documents)}
        # gold_ids_long is ["N/A"] outside the StackExchange domains and pony: no long-document setting.
        if any(e["gold_ids_long"] != ["N/A"] for e in examples):
            long_documents = _fixture_docs(domain, examples, "gold_ids_long")
            _write_jsonl(target / "long_documents" / f"{domain}.jsonl", long_documents)
            counts[domain]["long_documents"] = len(long_documents)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with examples/topics.bright-<domain>-original.jsonl")
    parser.add_argument("target", type=Path, help="folder to write, e.g. data/bright")
    args = parser.parse_args()
    print(json.dumps(convert(args.source, args.target), indent=1))


if __name__ == "__main__":
    main()
