"""Runs for the eval tests: SciFact BM25 runs built with bm25s, and small synthetic run folders."""

from __future__ import annotations

import functools
import gzip
import json
import random
from pathlib import Path

from eval.retrieval import score_run
from eval.runs import make_results, write_run
from ragkit.types import Qrels, Run, rank_hits

DATA = Path(__file__).resolve().parent.parent / "data"


@functools.lru_cache(maxsize=None)
def scifact_bm25_run(k1: float = 0.9, b: float = 0.4, stem: bool = True) -> tuple[Run, Qrels]:
    """Top-100 BM25 run over the bundled SciFact test queries (Lucene variant, title + text)."""
    import bm25s
    import Stemmer

    from ragkit.readers.qrels import read_qrels_tsv

    with gzip.open(DATA / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        corpus = [json.loads(line) for line in fh]
    with open(DATA / "scifact" / "queries.jsonl", encoding="utf-8") as fh:
        queries = [json.loads(line) for line in fh]
    stemmer = Stemmer.Stemmer("english") if stem else None
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(bm25s.tokenize([f"{d['title']} {d['text']}" for d in corpus], stopwords="en", stemmer=stemmer,
                                   show_progress=False), show_progress=False)
    ids, scores = retriever.retrieve(bm25s.tokenize([q["text"] for q in queries], stopwords="en", stemmer=stemmer,
                                                    show_progress=False), k=100, show_progress=False, n_threads=1)
    rankings = {q["_id"]: rank_hits({corpus[i]["_id"]: float(s) for i, s in zip(row_ids, row_scores)})
                for q, row_ids, row_scores in zip(queries, ids, scores)}
    return Run(rankings, name=f"bm25-{k1}-{b}"), read_qrels_tsv(DATA / "scifact" / "qrels" / "test.tsv")


def write_scored_run(run_dir: Path, name: str, run: Run, qrels: Qrels, task: str = "scifact",
                     metrics: tuple[str, ...] = ("ndcg@10", "map@100", "recall@100", "mrr"), **extra) -> dict:
    aggregate, per_query = score_run(run, qrels, list(metrics))
    config = {"name": name, "dataset": {"format": "beir", "path": f"data/{task}"}}
    results = make_results(name, "beir", aggregate, per_query, config, ragkit_version="test", task=task,
                           counts={"queries": len(per_query), "scored_queries": len(per_query)}, **extra)
    write_run(run_dir, run, results, config)
    return results


def write_synthetic_runs(root: Path) -> None:
    """Three systems × three tasks with per-query scores, plus cache-mode runs with TTFT and F1."""
    rng = random.Random(0)
    for name, level in [("bm25", 0.45), ("dense", 0.5), ("hybrid", 0.6)]:
        for task in ["scifact", "bright-biology", "coir-cosqa"]:
            per_query = {f"q{i}": {"ndcg@10": min(1.0, max(0.0, level + rng.gauss(0, 0.15)))} for i in range(40)}
            aggregate = {"ndcg@10": sum(v["ndcg@10"] for v in per_query.values()) / 40}
            config = {"name": name, "dataset": {"format": "beir", "path": task}}
            results = make_results(name, "beir", aggregate, per_query, config, ragkit_version="test", task=task)
            write_run(root / name / task, Run({q: rank_hits({"d1": 1.0}) for q in per_query}), results, config)
    for mode, ttft, f1 in [("full", 2.0, 0.42), ("prefix", 1.4, 0.42), ("blend", 0.6, 0.39), ("naive", 0.4, 0.30)]:
        per_query = {f"m{i}": {"f1": min(1.0, max(0.0, f1 + rng.gauss(0, 0.1))), "ttft_s": ttft} for i in range(20)}
        aggregate = {"f1": sum(v["f1"] for v in per_query.values()) / 20, "ttft_s": ttft}
        config = {"name": f"musique-{mode}", "dataset": {"format": "jsonl", "path": "musique"}}
        results = make_results(f"musique-{mode}", "beir", aggregate, per_query, config, ragkit_version="test",
                               task="musique", cache_mode=mode)
        write_run(root / f"musique-{mode}", Run({}), results, config)


def write_answer_eval_run(root: Path) -> dict:
    """An `ragkit eval --reference full` run as Pipeline.evaluate writes it: retrieval and answer metrics per
    query, blend's TTFT and questions/s, and full's own figures under `full_`."""
    rng = random.Random(1)
    per_query = {}
    for i in range(20):
        per_query[f"q{i}"] = {"ndcg@10": rng.random(), "f1": rng.random(), "em": float(rng.random() > 0.7),
                              "ttft_s": 0.5 + rng.random() * 0.2, "agreement": 0.9 + rng.random() * 0.1,
                              "kl": rng.random() * 0.01, "chunk_hit_rate": 1.0, "recompute_share": 0.2,
                              "full_f1": rng.random(), "full_ttft_s": 2.0 + rng.random()}
    aggregate = {m: sum(v[m] for v in per_query.values()) / 20 for m in per_query["q0"]}
    aggregate.update({"ttft_p50_s": 0.6, "ttft_p90_s": 0.68, "full_ttft_p50_s": 2.5})
    config = {"name": "musique-rag", "dataset": {"format": "beir", "path": "data/musique-rag"}}
    results = make_results("musique-rag", "beir", aggregate, per_query, config, ragkit_version="test",
                           task="musique-rag", cache_mode="blend", reference_mode="full",
                           timings={"search_s": 0.1, "answer_s": 14.0, "questions_per_s": 1.43},
                           counts={"queries": 20, "scored_queries": 20, "answered_queries": 20})
    write_run(root / "musique-rag", Run({q: rank_hits({"p0001": 1.0}) for q in per_query}), results, config)
    return results
