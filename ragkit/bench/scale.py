"""`ragkit bench scale`: streaming, sharded indexes at size, in one process and on Ray with 2 shards.

Data (real text and real embeddings, resampled to size):
- Dense: clustered real MiniLM embeddings, built as `ragkit.bench.retrieval` builds its 200k set: each
  vector is a SciFact document embedding (the first `centres` documents) plus Gaussian noise of
  norm 0.6, renormalised; generated part by part into the embedding store (float16), never all
  in RAM. Queries are SciFact test query embeddings; truth is exact inner-product top-10,
  computed by streaming over the parts.
- BM25: chunks of three sentences drawn at random (seeded) from the SciFact abstracts.
Each build runs in a fresh child process, so its peak RSS is the build's own. Searches run on
one thread, one query at a time (latency) and as one batch (QPS).
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ragkit.types import Chunk

DATA = Path(__file__).resolve().parents[2] / "data" / "scifact"
SENTENCES_PER_CHUNK = 3
GIB = 1 << 30


def _in_child(fn: Callable, *args: Any) -> tuple[Any, float]:
    """fn(*args) in a fresh process: (its result, its peak RSS in GiB)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measured, (fn, *args))


def _measured(fn: Callable, *args: Any) -> tuple[Any, float]:
    """VmHWM, not ru_maxrss: a spawned child's ru_maxrss starts at its parent's peak."""
    out = fn(*args)
    status = Path("/proc/self/status").read_text()
    return out, round(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024 / GIB, 3)


def _size_gib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / GIB, 3)


def _latency(search: Callable[[np.ndarray | list], list], queries, batch: int) -> dict[str, float]:
    single = []
    for i in range(len(queries)):
        start = time.perf_counter()
        search(queries[i:i + 1])
        single.append(time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        search(queries[i:i + batch])
    qps = len(queries) / (time.perf_counter() - start)
    return {"latency_p50_ms": round(1000 * float(np.percentile(single, 50)), 2),
            "latency_p90_ms": round(1000 * float(np.percentile(single, 90)), 2), "qps": round(qps, 1)}


# -- data --------------------------------------------------------------------------------------


def _scifact_texts() -> tuple[list[str], list[str]]:
    with gzip.open(DATA / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    qrels = {line.split("\t")[0] for line in (DATA / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    queries = [json.loads(line) for line in (DATA / "queries.jsonl").read_text().splitlines()]
    return [f"{d.get('title', '')}\n{d['text']}" for d in docs], [q["text"] for q in queries if q["_id"] in qrels]


def sentence_chunks(n: int, seed: int = 0) -> list[Chunk]:
    """n chunks of SENTENCES_PER_CHUNK sentences resampled from the SciFact abstracts."""
    docs, _ = _scifact_texts()
    sentences = [s for d in docs for s in re.split(r"(?<=[.!?])\s+", d.split("\n", 1)[1]) if len(s) > 20]
    picks = np.random.default_rng(seed).integers(0, len(sentences), size=(n, SENTENCES_PER_CHUNK))
    return [Chunk(f"s{i:08d}", f"s{i:08d}", " ".join(sentences[j] for j in row), (), (0, 0), "")
            for i, row in enumerate(picks.tolist())]


def _embed_centres(centres: int, queries: int, cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
    import retrievers

    docs, query_texts = _scifact_texts()
    dense = retrievers.build({"type": "dense", "cache_dir": cache_dir})
    from retrievers.embedding_cache import EmbeddingCache

    cache = EmbeddingCache(cache_dir, dense.encoder.fingerprint())
    vectors, _ = cache.embed(docs[:centres], lambda todo: dense.encoder.encode(todo, "document", progress=True))
    return vectors, dense.encoder.encode(query_texts[:queries], "query")


def _write_clustered(store_dir: str, centres: np.ndarray, n: int, part_rows: int) -> int:
    from ragkit.bench.retrieval import clustered_embeddings
    from retrievers.embedding_store import EmbeddingStore

    store = EmbeddingStore(store_dir, f"clustered-{n}", dtype="float16")
    for part, start in enumerate(range(store.count, n, part_rows)):
        store.append(clustered_embeddings(centres, min(part_rows, n - start), seed=start))
    return store.count


def _exact_top10(store_dir: str, queries: np.ndarray, ids) -> list[list[str]]:
    from retrievers.embedding_store import EmbeddingStore

    store = EmbeddingStore.open(store_dir)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    offset = 0
    for number in range(len(store.part_rows)):
        scores = queries @ np.asarray(store.part(number), dtype=np.float32).T
        top = np.argpartition(-scores, min(10, scores.shape[1] - 1), axis=1)[:, :10]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        best_rows = np.concatenate([best_rows, top + offset], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :10]
        best_scores, best_rows = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_rows, keep, 1)
        offset += store.part_rows[number]
    return [[ids(r) for r in row] for row in best_rows.tolist()]


# -- builds (each in a child process) -----------------------------------------------------------


class _Ids:
    """v00000000, v00000001, ... without a list of millions of strings."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [f"v{i:09d}" for i in range(*key.indices(self.n))]
        return f"v{key:09d}"


def _build_dense(spec: dict, store_dir: str, folder: str, shards: int, budget: int, ray_cpus: int = 0) -> dict:
    from retrievers.embedding_store import EmbeddingStore
    from retrievers.shards import BuildPlan, LocalRunner, build_from_embeddings

    runner = LocalRunner()
    if ray_cpus:
        runner = _ray_runner(ray_cpus)
    store = EmbeddingStore.open(store_dir)
    start = time.perf_counter()
    Path(folder).mkdir()
    build_from_embeddings(spec, 0, _Ids(store.count), Path(folder), BuildPlan(shards, budget, runner), store)
    return {"build_s": round(time.perf_counter() - start, 2)}


def _build_bm25(n: int, folder: str, shards: int, budget: int, ray_cpus: int = 0) -> dict:
    from retrievers.shards import BuildPlan, LocalRunner, build

    chunks = sentence_chunks(n)
    runner = _ray_runner(ray_cpus) if ray_cpus else LocalRunner()
    start = time.perf_counter()
    Path(folder).mkdir()
    manifest = build({"type": "bm25"}, 0, chunks, Path(folder), BuildPlan(shards, budget, runner))
    return {"build_s": round(time.perf_counter() - start, 2), "shards": len(manifest["shards"])}


def _ray_runner(cpus: int):
    import ray

    from ragkit.config import ClusterConfig
    from retrievers.ray_backend import RayRunner

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return RayRunner(ClusterConfig(backend="ray", address="local", shards=2))


# -- the run ---------------------------------------------------------------------------------------


def run_scale_bench(dense_vectors: int = 50_000, bm25_chunks: int = 50_000, centres: int = 300, queries: int = 100,
                    memory_budget: str = "1GiB", nlist: int = 0, nprobe: int = 32, workdir: str | None = None,
                    cache_dir: str = ".ragkit/embeddings", log: Callable[[str], None] = lambda m: None) -> dict:
    import faiss

    from ragkit.config import parse_bytes
    from retrievers import ray_backend
    from retrievers.shards import ShardedRetriever

    faiss.omp_set_num_threads(1)
    budget = parse_bytes(memory_budget, "--memory-budget")
    root = Path(tempfile.mkdtemp(prefix="ragkit-scale-", dir=workdir))
    try:
        log(f"embedding {centres} SciFact centres and {queries} queries with MiniLM (cached in {cache_dir})")
        centre_vectors, query_vectors = _embed_centres(centres, queries, cache_dir)
        store_dir = str(root / "store")
        start = time.perf_counter()
        _write_clustered(store_dir, centre_vectors, dense_vectors, 100_000)
        report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                  "memory_budget": memory_budget}
        dense: dict[str, Any] = {"vectors": dense_vectors, "generate_s": round(time.perf_counter() - start, 2),
                                 "source": f"SciFact MiniLM embeddings of {centres} documents + noise of norm 0.6"}
        ids = _Ids(dense_vectors)
        truth = _exact_top10(store_dir, query_vectors, ids.__getitem__)
        spec = {"type": "ivfpq", "nlist": nlist or max(16, int(4 * dense_vectors ** 0.5)), "nprobe": nprobe,
                "m": 48, "nbits": 8, "rerank": 10}
        log(f"dense: building IVF-PQ (on-disk lists) over {dense_vectors} vectors")
        built, rss = _in_child(_build_dense, spec, store_dir, str(root / "dense"), 1, budget)
        index = ShardedRetriever(spec, 0, root / "dense")
        hits = index.search_vectors(query_vectors, 10)
        recall = float(np.mean([len({h.id for h in a} & set(b)) / 10 for a, b in zip(hits, truth)]))
        dense.update(built, peak_rss_gib=rss, index_gib=_size_gib(root / "dense"), recall_at_10=round(recall, 4),
                     params={k: v for k, v in spec.items() if k != "type"},
                     build_vectors_per_s=round(dense_vectors / built["build_s"]),
                     **_latency(lambda q: index.search_vectors(q, 10), query_vectors, 32))
        report["dense"] = dense

        log(f"bm25: {bm25_chunks} chunks of resampled SciFact sentences, sharded within {memory_budget}")
        built, rss = _in_child(_build_bm25, bm25_chunks, str(root / "bm25"), 2, budget)
        bm25 = ShardedRetriever({"type": "bm25"}, 0, root / "bm25")
        _, query_texts = _scifact_texts()
        query_texts = query_texts[:queries]
        report["bm25"] = {"chunks": bm25_chunks, **built, "peak_rss_gib": rss, "index_gib": _size_gib(root / "bm25"),
                          "build_docs_per_s": round(bm25_chunks / built["build_s"]),
                          "source": f"{SENTENCES_PER_CHUNK} random SciFact sentences per chunk",
                          **_latency(lambda q: bm25.search(q, 10), query_texts, 32)}

        log("Ray, 2 shards on a local 2-CPU cluster vs this process with the same 2 shards")
        single_bm25, _ = _in_child(_build_bm25, bm25_chunks, str(root / "bm25-2"), 2, 8 * GIB)
        ray_bm25, _ = _in_child(_build_bm25, bm25_chunks, str(root / "bm25-ray"), 2, 8 * GIB, 2)
        _in_child(_build_dense, spec, store_dir, str(root / "dense-2"), 2, budget)
        import ray

        from ragkit.config import ClusterConfig

        cluster = ClusterConfig(backend="ray", address="local", shards=2)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            pool = ray_backend.actor_pool(cluster)
            same_bm25 = ShardedRetriever({"type": "bm25"}, 0, root / "bm25-ray", pool).search(query_texts, 10) == \
                ShardedRetriever({"type": "bm25"}, 0, root / "bm25-2").search(query_texts, 10)
            same_dense = ShardedRetriever(spec, 0, root / "dense-2", pool).search_vectors(query_vectors, 10) == \
                ShardedRetriever(spec, 0, root / "dense-2").search_vectors(query_vectors, 10)
        finally:
            ray.shutdown()
        report["ray"] = {"bm25_build_single_s": single_bm25["build_s"], "bm25_build_ray_s": ray_bm25["build_s"],
                         "bm25_identical": same_bm25, "dense_identical": same_dense}
        report.update({
            "dense_10m_peak_rss_gib": dense["peak_rss_gib"], "dense_10m_recall_at_10": dense["recall_at_10"],
            "dense_10m_qps": dense["qps"], "bm25_2m_peak_rss_gib": report["bm25"]["peak_rss_gib"],
            "ray_vs_single_identical": bool(same_bm25 and same_dense),
            "ray_build_speedup": round(single_bm25["build_s"] / ray_bm25["build_s"], 2),
            "sizes_note": f"dense_10m_* / bm25_2m_* keys hold this run's sizes ({dense_vectors} vectors, "
                          f"{bm25_chunks} chunks); the names are the full-size targets",
        })
        return report
    finally:
        shutil.rmtree(root, ignore_errors=True)


def format_report(report: dict) -> str:
    d, b, r = report["dense"], report["bm25"], report["ray"]
    return "\n".join([
        f"dense IVF-PQ on-disk ({d['vectors']} vectors, {d['params']}): build {d['build_s']} s "
        f"({d['build_vectors_per_s']} vec/s), peak RSS {d['peak_rss_gib']} GiB, index {d['index_gib']} GiB",
        f"  recall@10 vs exact {d['recall_at_10']}, latency p50 {d['latency_p50_ms']} ms / p90 "
        f"{d['latency_p90_ms']} ms, {d['qps']} QPS (1 thread)",
        f"BM25 sharded ({b['chunks']} chunks, {b['shards']} shards): build {b['build_s']} s "
        f"({b['build_docs_per_s']} docs/s), peak RSS {b['peak_rss_gib']} GiB, index {b['index_gib']} GiB",
        f"  latency p50 {b['latency_p50_ms']} ms / p90 {b['latency_p90_ms']} ms, {b['qps']} QPS",
        f"Ray 2 shards vs one process 2 shards: BM25 build {r['bm25_build_ray_s']} s vs {r['bm25_build_single_s']} s "
        f"(speedup {report['ray_build_speedup']}), identical results: {report['ray_vs_single_identical']}",
        report["sizes_note"],
    ])
