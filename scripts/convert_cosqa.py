"""Convert the CoSQA code-search release (CoCLR repo, data/search/) into a BEIR folder.

    python scripts/convert_cosqa.py ../shared/data/cosqa_coclr data/cosqa

corpus.jsonl.gz: one {"_id", "title": "", "text": code} per function of code_idx_map.txt,
ordered by its integer id (the id becomes the string _id). queries.jsonl: the test then the
dev queries ({"_id": idx, "text": doc}). qrels/<split>.tsv: query-id, corpus-id (= the
query's retrieval_idx), score 1. The gzip header carries no timestamp, so reruns give the
same bytes and the same dataset fingerprint.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

SPLITS = {"test": "cosqa-retrieval-test-500.json", "dev": "cosqa-retrieval-dev-500.json"}


def convert(source: Path, target: Path) -> dict[str, int]:
    code_to_id = json.loads((source / "code_idx_map.txt").read_text(encoding="utf-8"))
    id_to_code = {code_id: code for code, code_id in code_to_id.items()}
    if sorted(id_to_code) != list(range(len(code_to_id))):
        raise SystemExit("code_idx_map.txt: ids are not a permutation of 0..n-1")
    target.mkdir(parents=True, exist_ok=True)
    corpus = "".join(json.dumps({"_id": str(i), "title": "", "text": id_to_code[i]}) + "\n"
                     for i in range(len(id_to_code)))
    with open(target / "corpus.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                                      filename="") as fh:
        fh.write(corpus.encode("utf-8"))

    counts = {"documents": len(id_to_code)}
    query_lines = []
    (target / "qrels").mkdir(exist_ok=True)
    for split, name in SPLITS.items():
        rows = json.loads((source / name).read_text(encoding="utf-8"))
        qrels = ["query-id\tcorpus-id\tscore"]
        for row in rows:
            if code_to_id[row["code"]] != row["retrieval_idx"]:
                raise SystemExit(f"{name}: {row['idx']}: gold code does not match retrieval_idx")
            query_lines.append(json.dumps({"_id": row["idx"], "text": row["doc"]}))
            qrels.append(f"{row['idx']}\t{row['retrieval_idx']}\t1")
        (target / "qrels" / f"{split}.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
        counts[f"{split} queries"] = len(rows)
    (target / "queries.jsonl").write_text("\n".join(query_lines) + "\n", encoding="utf-8")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with code_idx_map.txt and cosqa-retrieval-*-500.json")
    parser.add_argument("target", type=Path, help="BEIR folder to write, e.g. data/cosqa")
    args = parser.parse_args()
    print(convert(args.source, args.target))


if __name__ == "__main__":
    main()
