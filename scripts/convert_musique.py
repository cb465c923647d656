"""Pool the bundled MuSiQue sample's passages into one BEIR folder, for retrieve-then-answer runs.

    python scripts/convert_musique.py data/musique/musique_s.json.gz data/musique-rag

The sample (CacheBlend's `musique_s.json`) gives each of its 150 questions 10 passages and one
gold answer, but no supporting-passage labels. Here every distinct passage becomes one
document (a passage shared by several questions is stored once, ids `p0000`... in order of
first appearance) and the questions retrieve from the pooled corpus. Relevance, since the true
supporting passages are unknown: grade 1 for each of the question's own 10 passages, grade 2
for those of them that contain a gold answer (SQuAD-normalised, whole words).

queries.jsonl: {"_id": "q<n>", "text": question, "answers": [gold, ...]} for all 150 questions.
qrels/dev.tsv: questions q0-q49 (a query log to warm the KV cache from); qrels/test.tsv: q50-q149
(held out). The gzip header carries no timestamp, so reruns give the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.answers import normalize_answer  # noqa: E402
from ragkit.readers.musique import read_musique  # noqa: E402

DEV_QUESTIONS = 50  # q0..q49 form the dev split, the rest the test split
OWN_PASSAGE, ANSWER_PASSAGE = 1, 2


def contains_answer(passage: str, answers: list[str]) -> bool:
    text = f" {normalize_answer(passage)} "
    return any(norm and f" {norm} " in text for norm in map(normalize_answer, answers))


def convert(source: Path, target: Path) -> dict[str, int]:
    samples = read_musique(source)
    doc_ids: dict[str, str] = {}
    corpus, queries, qrels = [], [], {"dev": [], "test": []}
    for n, sample in enumerate(samples):
        qid = f"q{n}"
        queries.append(json.dumps({"_id": qid, "text": sample["question"], "answers": sample["answers"]},
                                  ensure_ascii=False))
        grades: dict[str, int] = {}
        for ctx in sample["ctxs"]:
            if ctx["text"] not in doc_ids:
                doc_ids[ctx["text"]] = f"p{len(doc_ids):04d}"
                corpus.append(json.dumps({"_id": doc_ids[ctx["text"]], "title": ctx["title"], "text": ctx["text"]},
                                         ensure_ascii=False))
            grade = ANSWER_PASSAGE if contains_answer(ctx["text"], sample["answers"]) else OWN_PASSAGE
            doc_id = doc_ids[ctx["text"]]
            grades[doc_id] = max(grade, grades.get(doc_id, 0))
        split = "dev" if n < DEV_QUESTIONS else "test"
        qrels[split] += [f"{qid}\t{doc_id}\t{grade}" for doc_id, grade in grades.items()]

    (target / "qrels").mkdir(parents=True, exist_ok=True)
    with open(target / "corpus.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                                      filename="") as fh:
        fh.write(("\n".join(corpus) + "\n").encode("utf-8"))
    (target / "queries.jsonl").write_text("\n".join(queries) + "\n", encoding="utf-8")
    for split, rows in qrels.items():
        (target / "qrels" / f"{split}.tsv").write_text("\n".join(["query-id\tcorpus-id\tscore", *rows]) + "\n",
                                                       encoding="utf-8")
    return {"documents": len(corpus), "queries": len(queries), "dev judgements": len(qrels["dev"]),
            "test judgements": len(qrels["test"]),
            "answer-bearing judgements": sum(row.endswith(f"\t{ANSWER_PASSAGE}") for rows in qrels.values()
                                             for row in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="musique_s.json[.gz], e.g. data/musique/musique_s.json.gz")
    parser.add_argument("target", type=Path, help="BEIR folder to write, e.g. data/musique-rag")
    args = parser.parse_args()
    print(convert(args.source, args.target))


if __name__ == "__main__":
    main()
