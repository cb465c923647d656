"""`ragkit bench retrieval`: ragkit's retrievers side by side with raw bm25s, rank-bm25 and FAISS.

Everything runs in one process on the same data and queries, one thread, so the printed
ratios compare like with like:
- SciFact (bundled BEIR test split, one chunk per document): nDCG@10 of BM25, dense MiniLM,
  HNSW, IVF-PQ and RRF hybrid; BM25 index docs/s and QPS against raw bm25s and rank-bm25.
- Scale set, sparse: SciFact abstracts cut into overlapping 48-word windows (stride 4 words),
  i.e. real text, at least 200k chunks; SciFact test queries.
- Scale set, dense: clustered real embeddings. Each vector is a SciFact MiniLM document
  embedding plus Gaussian noise of norm about 0.6, renormalised; queries are the SciFact test
  query embeddings. Recall@10 of HNSW and IVF-PQ is measured against exact search.
"""

from __future__ import annotations

import gzip
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ragkit.types import Chunk, Hit

WINDOW, STRIDE = 48, 4
NOISE_NORM = 0.6


def _chunk(cid: str, text: str, title: str = "") -> Chunk:
    return Chunk(id=cid, doc_id=cid, text=text, token_ids=(), span=(0, len(text)), content_hash="", title=title)


def load_scifact(data: Path, limit_docs: int = 0, limit_queries: int = 0):
    """One chunk per document, the test queries that have judgements, and the qrels."""
    with gzip.open(data / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    qrels: dict[str, dict[str, int]] = {}
    for line in (data / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        qid, did, grade = line.split("\t")
        qrels.setdefault(qid, {})[did] = int(grade)
    queries = [json.loads(line) for line in (data / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    queries = [(q["_id"], q["text"]) for q in queries if q["_id"] in qrels]
    if limit_queries:
        queries = queries[:limit_queries]
    if limit_docs:  # keep the judged documents of the kept queries, then fill up
        wanted = {d for qid, _ in queries for d in qrels[qid]}
        docs = [d for d in docs if d["_id"] in wanted] + [d for d in docs if d["_id"] not in wanted]
        docs = docs[:max(limit_docs, len(wanted))]
    chunks = [_chunk(d["_id"], d["text"], d.get("title", "")) for d in docs]
    return chunks, queries, qrels


def ndcg_at_10(results: list[list[Hit]], queries, qrels) -> float:
    import pytrec_eval

    run = {qid: {h.id: h.score for h in hits} or {"__none__": 0.0} for (qid, _), hits in zip(queries, results)}
    judged = {qid: qrels[qid] for qid, _ in queries}
    per_query = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10"}).evaluate(run)
    return round(float(np.mean([per_query[qid]["ndcg_cut_10"] for qid, _ in queries])), 4)


def _timed(fn: Callable, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def _race(first: Callable, second: Callable, repeat: int = 5):
    """Time two systems alternately, best of `repeat` each, so a change in machine load hits both alike."""
    outs, best = [None, None], [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return outs, best


def scale_windows(chunks: list[Chunk], minimum: int) -> list[Chunk]:
    """Overlapping word windows of real abstracts, repeated with a shifted start until `minimum`."""
    out: list[Chunk] = []
    offset = 0
    while len(out) < minimum:
        for chunk in chunks:
            words = chunk.text.split()
            for start in range(offset, max(len(words) - WINDOW, 0) + 1, STRIDE):
                out.append(_chunk(f"{chunk.id}@{start}", " ".join(words[start:start + WINDOW])))
        offset += 1
    return out[:max(minimum, 0)]


def clustered_embeddings(centres: np.ndarray, n: int, seed: int = 0, noise_dtype: type = np.float64) -> np.ndarray:
    """n vectors: a random centre each plus Gaussian noise of norm NOISE_NORM, renormalised.

    float32 noise draws 3x faster (the 10M-vector scale set); float64 keeps the 200k set as published."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(centres), n)
    noise = rng.standard_normal(size=(n, centres.shape[1]), dtype=noise_dtype).astype(np.float32, copy=False)
    noise *= NOISE_NORM / np.sqrt(centres.shape[1])
    vectors = centres[picks] + noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def bm25_side_by_side(chunks: list[Chunk], queries: list[str], reference_queries: int) -> dict:
    """Index docs/s and QPS: ragkit BM25 (both backends), raw bm25s, raw rank-bm25."""
    import bm25s
    import Stemmer
    from rank_bm25 import BM25Okapi

    import retrievers

    texts = [f"{c.title}\n{c.text}" if c.title else c.text for c in chunks]
    few = queries[:reference_queries]
    out: dict = {"chunks": len(chunks), "queries": len(queries), "reference_queries": len(few)}

    ours = retrievers.build({"type": "bm25"})
    _, seconds = _timed(lambda: ours.index(chunks))
    out["ragkit_bm25s"] = {"index_docs_per_s": round(len(chunks) / seconds)}

    stemmer = Stemmer.Stemmer("english")

    def raw_index():
        model = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
        model.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
        return model

    raw, seconds = _timed(raw_index)
    out["raw_bm25s"] = {"index_docs_per_s": round(len(chunks) / seconds)}

    def raw_search():
        tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, show_progress=False, return_ids=False)
        return raw.retrieve(tokens, k=10, show_progress=False)

    (results, (raw_docs, _)), (ours_s, raw_s) = _race(lambda: ours.search(queries, 10), raw_search)
    out["ragkit_bm25s"]["qps"] = round(len(queries) / ours_s, 1)
    out["raw_bm25s"]["qps"] = round(len(queries) / raw_s, 1)
    same = [[chunks[d].id for d in row] == [h.id for h in hits] for row, hits in zip(raw_docs, results) if len(hits) == 10]
    out["top10_identical_to_raw_bm25s"] = round(float(np.mean(same)), 4)

    reference = retrievers.build({"type": "bm25", "backend": "rank_bm25"})
    reference.index(chunks)
    reference.search(few[:1], 10)  # builds the rank-bm25 model
    ref_results, seconds = _timed(lambda: reference.search(few, 10))
    out["ragkit_rank_bm25"] = {"qps": round(len(few) / seconds, 2)}
    out["rank_bm25_backend_identical_top10"] = [h.id for r in ref_results for h in r] == \
        [h.id for r in results[:len(few)] for h in r]

    tokenized = bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False, return_ids=False)
    plain, seconds = _timed(lambda: BM25Okapi(tokenized, k1=0.9, b=0.4))
    out["raw_rank_bm25"] = {"index_docs_per_s": round(len(chunks) / seconds)}
    few_tokens = bm25s.tokenize(few, stopwords="en", stemmer=stemmer, show_progress=False, return_ids=False)
    _, seconds = _timed(lambda: [np.argsort(-plain.get_scores(q))[:10] for q in few_tokens])
    out["raw_rank_bm25"]["qps"] = round(len(few) / seconds, 2)
    out["qps_ratio_vs_bm25s"] = round(out["ragkit_bm25s"]["qps"] / out["raw_bm25s"]["qps"], 3)
    out["qps_ratio_vs_rank_bm25"] = round(out["ragkit_bm25s"]["qps"] / out["raw_rank_bm25"]["qps"], 1)
    out["retriever"] = ours
    return out


def _recall(hits: list[list[Hit]], truth: list[list[Hit]]) -> float:
    return round(float(np.mean([len({h.id for h in a} & {h.id for h in b}) / max(len(b), 1)
                                for a, b in zip(hits, truth)])), 4)


def dense_side_by_side(ids: list[str], vectors: np.ndarray, queries: np.ndarray, ann: dict) -> dict:
    """Exact vs HNSW vs IVF-PQ (recall@10 against exact, QPS) and ragkit's overhead over raw FAISS."""
    import faiss

    import retrievers

    out: dict = {"chunks": len(ids), "queries": len(queries)}
    raw = faiss.IndexFlatIP(vectors.shape[1])
    raw.add(vectors)
    built = {}
    for name, spec in [("exact", {"type": "dense"}), ("hnsw", {"type": "hnsw", **ann["hnsw"]}),
                       ("ivfpq", {"type": "ivfpq", **ann["ivfpq"]})]:
        r = retrievers.build(spec)
        _, build_s = _timed(lambda: r.add_vectors(ids, vectors))
        hits, seconds = _timed(lambda: r.search_vectors(queries, 10), repeat=3)
        out[name] = {"build_vectors_per_s": round(len(ids) / build_s), "qps": round(len(queries) / seconds, 1),
                     "params": {k: v for k, v in spec.items() if k != "type"}}
        built[name] = (r, hits)
    truth = built["exact"][1]
    for name in ("hnsw", "ivfpq"):
        out[name]["recall_at_10"] = _recall(built[name][1], truth)
    exact = built["exact"][0]
    _, (exact_s, raw_s) = _race(lambda: exact.search_vectors(queries, 10), lambda: raw.search(queries, 10))
    out["exact"]["qps"] = round(len(queries) / exact_s, 1)
    out["raw_faiss_flat_qps"] = round(len(queries) / raw_s, 1)
    out["overhead_vs_faiss"] = round(out["raw_faiss_flat_qps"] / out["exact"]["qps"] - 1, 4)
    out["hnsw_qps_ratio_vs_exact"] = round(out["hnsw"]["qps"] / out["exact"]["qps"], 2)
    out["retrievers"] = {name: r for name, (r, _) in built.items()}
    return out


def run_retrieval_bench(data: Path, limit_docs: int = 0, limit_queries: int = 0, scale_chunks: int = 200_000,
                        reference_queries: int = 100, cache_dir: str = ".ragkit/embeddings",
                        log: Callable[[str], None] = lambda message: None) -> dict:
    """All figures of `ragkit bench retrieval` as one JSON-ready dict."""
    import faiss
    import torch

    import retrievers

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    chunks, queries, qrels = load_scifact(data, limit_docs, limit_queries)
    query_texts = [text for _, text in queries]
    report: dict = {"machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                                "faiss_gpus": faiss.get_num_gpus(), "threads": 1},
                    "scifact": {"documents": len(chunks), "queries": len(queries)}}

    log(f"SciFact BM25: {len(chunks)} chunks, {len(queries)} queries")
    sparse = bm25_side_by_side(chunks, query_texts, reference_queries)
    bm25 = sparse.pop("retriever")
    report["scifact"]["bm25"] = sparse
    bm25_hits = bm25.search(query_texts, 1000)

    log("SciFact dense: embedding documents (cached under %s)" % cache_dir)
    dense = retrievers.build({"type": "dense", "cache_dir": cache_dir})
    _, seconds = _timed(lambda: dense.index(chunks))
    query_vectors, encode_s = _timed(lambda: dense.encoder.encode(query_texts, "query"))
    dense_hits = dense.search_vectors(query_vectors, 1000)
    ndcg = {"bm25": ndcg_at_10(bm25_hits, queries, qrels), "dense": ndcg_at_10(dense_hits, queries, qrels)}
    ndcg["hybrid_rrf"] = ndcg_at_10(retrievers.fuse([bm25_hits, dense_hits], "rrf", k=100), queries, qrels)
    ndcg["hybrid_weighted_zscore"] = ndcg_at_10(
        retrievers.fuse([bm25_hits, dense_hits], "weighted", k=100, normalization="zscore"), queries, qrels)
    ann = {"hnsw": {"M": 32, "ef_construction": 200, "ef_search": 128},
           "ivfpq": {"nlist": 512, "nprobe": 32, "m": 48, "nbits": 8, "train_size": 20_000}}
    small_ann = {"hnsw": ann["hnsw"], "ivfpq": {**ann["ivfpq"], "nlist": max(1, len(chunks) // 64), "train_size": 0,
                                                   "nbits": 8 if len(chunks) >= 256 else 4}}
    small = dense_side_by_side(dense.ids, np.asarray(dense.vectors), query_vectors, small_ann)
    for name in ("hnsw", "ivfpq"):
        ndcg[name] = ndcg_at_10(small["retrievers"][name].search_vectors(query_vectors, 100), queries, qrels)
    small.pop("retrievers")
    report["scifact"]["ndcg_at_10"] = ndcg
    report["scifact"]["dense"] = {"embedded_now": dense.last_encoded, "index_s": round(seconds, 2),
                                  "query_encode_qps": round(len(queries) / encode_s, 1), **small}

    log(f"Scale set, sparse: {scale_chunks} windows of real text")
    windows = scale_windows(chunks, scale_chunks)
    scale_sparse = bm25_side_by_side(windows, query_texts, max(5, reference_queries // 5))
    scale_bm25 = scale_sparse.pop("retriever")
    report["scale_bm25"] = {"source": f"SciFact abstracts as {WINDOW}-word windows, stride {STRIDE} (real text)",
                            **scale_sparse}

    log(f"Scale set, dense: {scale_chunks} clustered real embeddings (HNSW build takes a while)")
    centres = np.asarray(dense.vectors)
    vectors = clustered_embeddings(centres, scale_chunks)
    ids = [f"v{i}" for i in range(scale_chunks)]
    scale_dense = dense_side_by_side(ids, vectors, query_vectors, ann)
    built = scale_dense.pop("retrievers")
    report["scale_dense"] = {"source": f"SciFact MiniLM document embeddings + Gaussian noise of norm {NOISE_NORM}, "
                                       "renormalised (clustered real embeddings); SciFact query embeddings",
                             **scale_dense}

    log("Scale set: save and reload (BM25 + HNSW)")
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        (Path(tmp) / "bm25").mkdir()
        (Path(tmp) / "hnsw").mkdir()
        _, save_s = _timed(lambda: (scale_bm25.save(Path(tmp) / "bm25"), built["hnsw"].save(Path(tmp) / "hnsw")))
        bm25_loaded, hnsw_loaded = retrievers.build({"type": "bm25"}), retrievers.build({"type": "hnsw", **ann["hnsw"]})
        _, load_bm25_s = _timed(lambda: bm25_loaded.load(Path(tmp) / "bm25"))
        _, load_hnsw_s = _timed(lambda: hnsw_loaded.load(Path(tmp) / "hnsw"))
        same_bm25 = bm25_loaded.search(query_texts, 10) == scale_bm25.search(query_texts, 10)
        same_hnsw = hnsw_loaded.search_vectors(query_vectors, 10) == built["hnsw"].search_vectors(query_vectors, 10)
    report["scale_persistence"] = {"save_s": round(save_s, 2), "load_bm25_s": round(load_bm25_s, 3),
                                   "load_hnsw_s": round(load_hnsw_s, 3), "reload_identical_bm25": same_bm25,
                                   "reload_identical_hnsw": same_hnsw}

    report.update({
        "bm25_qps_ratio_vs_bm25s": sparse["qps_ratio_vs_bm25s"],
        "bm25_qps_ratio_vs_rank_bm25": sparse["qps_ratio_vs_rank_bm25"],
        "dense_overhead_vs_faiss": scale_dense["overhead_vs_faiss"],
        "hnsw_recall_at_10": scale_dense["hnsw"]["recall_at_10"],
        "hnsw_qps_ratio_vs_exact": scale_dense["hnsw_qps_ratio_vs_exact"],
        "index_load_s": round(load_bm25_s + load_hnsw_s, 3),
        "scifact_ndcg_at_10": ndcg,
    })
    return report


def format_report(report: dict) -> str:
    """The headline figures as a short table."""
    sci, big, dense = report["scifact"], report["scale_bm25"], report["scale_dense"]
    lines = ["SciFact nDCG@10: " + "  ".join(f"{k} {v:.4f}" for k, v in sci["ndcg_at_10"].items()), ""]
    scale_title = f"scale ({big['chunks']})"
    lines.append(f"{'BM25 (docs/s | QPS)':<28}{'SciFact':>22}{scale_title:>26}")
    for name in ("ragkit_bm25s", "raw_bm25s", "ragkit_rank_bm25", "raw_rank_bm25"):
        cells = []
        for part in (sci["bm25"], big):
            row = part[name]
            cells.append(f"{row.get('index_docs_per_s', '-')!s:>10} | {row['qps']:>9}")
        lines.append(f"{name:<28}{cells[0]:>22}{cells[1]:>26}")
    lines.append("")
    lines.append(f"Dense scale set ({dense['chunks']} clustered real embeddings, {dense['queries']} queries):")
    for name in ("exact", "hnsw", "ivfpq"):
        row = dense[name]
        recall = f"recall@10 {row['recall_at_10']:.4f}" if "recall_at_10" in row else "recall@10 1 (reference)"
        lines.append(f"  {name:<6} {row['qps']:>9} QPS  build {row['build_vectors_per_s']:>7} vec/s  {recall}")
    lines.append(f"  raw faiss flat {dense['raw_faiss_flat_qps']} QPS")
    lines.append("")
    for key in ("bm25_qps_ratio_vs_bm25s", "bm25_qps_ratio_vs_rank_bm25", "dense_overhead_vs_faiss",
                "hnsw_recall_at_10", "hnsw_qps_ratio_vs_exact", "index_load_s"):
        lines.append(f"{key:<32}{report[key]}")
    return "\n".join(lines)
