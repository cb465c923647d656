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
MAX_DEFAULT_NLIST = 2048


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


def _write_clustered(store_dir: str, centres: np.ndarray, n: int, part_rows: int = 100_000) -> int:
    """Part p is seeded with its first row, so the first m rows of any two sizes are the same vectors."""
    from ragkit.bench.retrieval import clustered_embeddings
    from retrievers.embedding_store import EmbeddingStore

    store = EmbeddingStore(store_dir, f"clustered-{n}", dtype="float16")
    for start in range(store.count, n, part_rows):
        store.append(clustered_embeddings(centres, min(part_rows, n - start), seed=start, noise_dtype=np.float32))
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
    plan = BuildPlan(shards, budget, runner)
    build_from_embeddings(spec, 0, _Ids(store.count), Path(folder), plan, store)
    return {"build_s": round(time.perf_counter() - start, 2), "stage_s": plan.stage_seconds}


def _build_bm25(n: int, folder: str, shards: int, budget: int, ray_cpus: int = 0) -> dict:
    from retrievers.shards import BuildPlan, LocalRunner, build

    start = time.perf_counter()
    chunks = sentence_chunks(n)
    chunks_s = round(time.perf_counter() - start, 2)
    runner = _ray_runner(ray_cpus) if ray_cpus else LocalRunner()
    start = time.perf_counter()
    Path(folder).mkdir()
    plan = BuildPlan(shards, budget, runner)
    manifest = build({"type": "bm25"}, 0, chunks, Path(folder), plan)
    return {"build_s": round(time.perf_counter() - start, 2), "shards": len(manifest["shards"]),
            "stage_s": {"make_chunks": chunks_s, **plan.stage_seconds}}


def _ray_runner(cpus: int):
    import ray

    from ragkit.config import ClusterConfig
    from retrievers.ray_backend import RayRunner

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return RayRunner(ClusterConfig(backend="ray", address="local", shards=2))


# -- the run ---------------------------------------------------------------------------------------


def default_nlist(vectors: int) -> int:
    """4 * sqrt(n) lists, at most MAX_DEFAULT_NLIST: assigning 10M vectors to 12,649 lists costs ~20 min on one core."""
    return max(16, min(int(4 * vectors ** 0.5), MAX_DEFAULT_NLIST))


def _per_s(count: int, seconds: float) -> int:
    return round(count / max(seconds, 1e-9))


def run_scale_bench(dense_vectors: int = 50_000, bm25_chunks: int = 50_000, centres: int = 300, queries: int = 100,
                    memory_budget: str = "1GiB", nlist: int = 0, nprobe: int = 32, workdir: str | None = None,
                    cache_dir: str = ".ragkit/embeddings", log: Callable[[str], None] = lambda m: None,
                    ray_vectors: int = 0, ray_chunks: int = 0, rerank: int = 20, pq_m: int = 96) -> dict:
    """The whole bench; `ray_vectors` / `ray_chunks` (0: the full sizes) size the Ray-vs-one-process rebuilds."""
    import faiss

    from ragkit.config import parse_bytes
    from retrievers import ray_backend
    from retrievers.shards import ShardedRetriever

    faiss.omp_set_num_threads(1)
    budget = parse_bytes(memory_budget, "--memory-budget")
    ray_vectors, ray_chunks = min(ray_vectors or dense_vectors, dense_vectors), min(ray_chunks or bm25_chunks, bm25_chunks)
    root = Path(tempfile.mkdtemp(prefix="ragkit-scale-", dir=workdir))
    try:
        log(f"embedding {centres} SciFact centres and {queries} queries with MiniLM (cached in {cache_dir})")
        start = time.perf_counter()
        centre_vectors, query_vectors = _embed_centres(centres, queries, cache_dir)
        report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                  "memory_budget": memory_budget, "embed_centres_s": round(time.perf_counter() - start, 2)}
        log(f"dense: writing {dense_vectors} clustered vectors (float16) and the exact top-10 of {queries} queries")
        store_dir = str(root / "store")
        start = time.perf_counter()
        _write_clustered(store_dir, centre_vectors, dense_vectors)
        generate_s = time.perf_counter() - start
        ids = _Ids(dense_vectors)
        start = time.perf_counter()
        truth = _exact_top10(store_dir, query_vectors, ids.__getitem__)
        truth_s = time.perf_counter() - start
        spec = {"type": "ivfpq", "nlist": nlist or default_nlist(dense_vectors), "nprobe": nprobe,
                "m": pq_m, "nbits": 8, "rerank": rerank}
        log(f"dense: building IVF-PQ (on-disk lists, nlist {spec['nlist']}) over {dense_vectors} vectors")
        built, rss = _in_child(_build_dense, spec, store_dir, str(root / "dense"), 1, budget)
        index = ShardedRetriever(spec, 0, root / "dense")
        hits = index.search_vectors(query_vectors, 10)
        recall = float(np.mean([len({h.id for h in a} & set(b)) / 10 for a, b in zip(hits, truth)]))
        stages = built["stage_s"]
        report["dense"] = {
            "vectors": dense_vectors, "source": f"SciFact MiniLM embeddings of {centres} documents + noise of norm 0.6",
            "generate_s": round(generate_s, 2), "generate_vectors_per_s": _per_s(dense_vectors, generate_s),
            "exact_truth_s": round(truth_s, 2), "exact_truth_vectors_per_s": _per_s(dense_vectors, truth_s),
            "build_s": built["build_s"], "train_s": stages["train"], "add_s": stages["add"],
            "add_vectors_per_s": _per_s(dense_vectors, stages["add"]),
            "build_vectors_per_s": _per_s(dense_vectors, built["build_s"]),
            "peak_rss_gib": rss, "index_gib": _size_gib(root / "dense"), "recall_at_10": round(recall, 4),
            "params": {k: v for k, v in spec.items() if k != "type"},
            **_latency(lambda q: index.search_vectors(q, 10), query_vectors, 32)}
        del index

        log(f"bm25: {bm25_chunks} chunks of resampled SciFact sentences, sharded within {memory_budget}")
        built, rss = _in_child(_build_bm25, bm25_chunks, str(root / "bm25"), 2, budget)
        bm25 = ShardedRetriever({"type": "bm25"}, 0, root / "bm25")
        _, query_texts = _scifact_texts()
        query_texts = query_texts[:queries]
        stages = built.pop("stage_s")
        report["bm25"] = {"chunks": bm25_chunks, **built, "peak_rss_gib": rss, "index_gib": _size_gib(root / "bm25"),
                          "build_docs_per_s": _per_s(bm25_chunks, built["build_s"]),
                          **{f"{stage}_s": seconds for stage, seconds in stages.items()},
                          **{f"{stage}_docs_per_s": _per_s(bm25_chunks, seconds) for stage, seconds in stages.items()},
                          "source": f"{SENTENCES_PER_CHUNK} random SciFact sentences per chunk",
                          **_latency(lambda q: bm25.search(q, 10), query_texts, 32)}
        del bm25

        log(f"Ray, 2 shards on a local 2-CPU cluster vs this process with the same 2 shards "
            f"({ray_chunks} chunks, {ray_vectors} vectors)")
        single_bm25, _ = _in_child(_build_bm25, ray_chunks, str(root / "bm25-2"), 2, 8 * GIB)
        ray_bm25, _ = _in_child(_build_bm25, ray_chunks, str(root / "bm25-ray"), 2, 8 * GIB, 2)
        ray_store = store_dir
        if ray_vectors < dense_vectors:
            ray_store = str(root / "store-ray")
            _write_clustered(ray_store, centre_vectors, ray_vectors)  # the first ray_vectors rows of the dense set
        _in_child(_build_dense, spec, ray_store, str(root / "dense-2"), 2, budget)
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
        report["ray"] = {"chunks": ray_chunks, "vectors": ray_vectors,
                         "bm25_build_single_s": single_bm25["build_s"], "bm25_build_ray_s": ray_bm25["build_s"],
                         "bm25_identical": same_bm25, "dense_identical": same_dense}
        report.update({
            "dense_10m_peak_rss_gib": report["dense"]["peak_rss_gib"],
            "dense_10m_recall_at_10": report["dense"]["recall_at_10"], "dense_10m_qps": report["dense"]["qps"],
            "bm25_2m_peak_rss_gib": report["bm25"]["peak_rss_gib"],
            "ray_vs_single_identical": bool(same_bm25 and same_dense),
            "ray_build_speedup": round(single_bm25["build_s"] / ray_bm25["build_s"], 2),
            "sizes_note": f"dense_10m_* / bm25_2m_* keys hold this run's sizes ({dense_vectors} vectors, "
                          f"{bm25_chunks} chunks); the names are the full-size targets. The Ray comparison "
                          f"(ray_*) rebuilt {ray_chunks} chunks and {ray_vectors} vectors",
        })
        return report
    finally:
        shutil.rmtree(root, ignore_errors=True)


def format_report(report: dict) -> str:
    d, b, r = report["dense"], report["bm25"], report["ray"]
    return "\n".join([
        f"dense IVF-PQ on-disk ({d['vectors']} vectors, {d['params']}): build {d['build_s']} s "
        f"({d['build_vectors_per_s']} vec/s; train {d['train_s']} s, add {d['add_vectors_per_s']} vec/s), "
        f"peak RSS {d['peak_rss_gib']} GiB, index {d['index_gib']} GiB",
        f"  generated at {d['generate_vectors_per_s']} vec/s, exact truth at {d['exact_truth_vectors_per_s']} vec/s",
        f"  recall@10 vs exact {d['recall_at_10']}, latency p50 {d['latency_p50_ms']} ms / p90 "
        f"{d['latency_p90_ms']} ms, {d['qps']} QPS (1 thread)",
        f"BM25 sharded ({b['chunks']} chunks, {b['shards']} shards): build {b['build_s']} s "
        f"({b['build_docs_per_s']} docs/s; statistics {b['statistics_docs_per_s']}, shards {b['shards_docs_per_s']} "
        f"docs/s), peak RSS {b['peak_rss_gib']} GiB, index {b['index_gib']} GiB",
        f"  latency p50 {b['latency_p50_ms']} ms / p90 {b['latency_p90_ms']} ms, {b['qps']} QPS",
        f"Ray 2 shards vs one process 2 shards: BM25 build {r['bm25_build_ray_s']} s vs {r['bm25_build_single_s']} s "
        f"(speedup {report['ray_build_speedup']}), identical results: {report['ray_vs_single_identical']}",
        report["sizes_note"],
    ])
