"""Give the bundled SciFact test claims yes/no gold answers from SciFact's claim labels.

    python scripts/add_scifact_answers.py <scifact raw_hf_csv>/claims_validation.csv data/scifact/queries.jsonl

A claim whose evidence is all SUPPORT gets `"answers": ["yes"]`, all CONTRADICT `["no"]`; a claim
without evidence (SciFact's "not enough info", 112 of the 300) or with mixed labels gets none,
so `ragkit eval` scores it for retrieval only. Query ids and texts are left as they are, and the
file is rewritten in place: reruns give the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

ANSWER = {"SUPPORT": "yes", "CONTRADICT": "no"}


def add_answers(claims_csv: Path, queries_path: Path) -> dict[str, int]:
    labels: dict[str, set[str]] = defaultdict(set)
    with open(claims_csv, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["evidence_label"]:
                labels[row["id"]].add(row["evidence_label"])
    lines, counts = [], {"yes": 0, "no": 0, "no gold answer": 0}
    for line in queries_path.read_text(encoding="utf-8").splitlines():
        record = {k: v for k, v in json.loads(line).items() if k != "answers"}
        found = labels.get(record["_id"], set())
        answer = ANSWER[next(iter(found))] if len(found) == 1 else None
        counts[answer or "no gold answer"] += 1
        if answer:
            record = {"_id": record["_id"], "text": record["text"], "answers": [answer],
                      **{k: v for k, v in record.items() if k not in ("_id", "text")}}
        lines.append(json.dumps(record))
    queries_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("claims_csv", type=Path, help="SciFact claims_validation.csv (id, claim, evidence_label, ...)")
    parser.add_argument("queries", type=Path, help="BEIR queries.jsonl to rewrite, e.g. data/scifact/queries.jsonl")
    args = parser.parse_args()
    print(add_answers(args.claims_csv, args.queries))


if __name__ == "__main__":
    main()
