"""`ragkit bench rerank`: LLM pointwise reranking on cached chunk KV against the same scorer uncached.

For the first `queries` judged queries of a config's dataset: retrieve, take the top `depth` documents
(each judged by its best chunk), warm exactly those chunks, then score every (query, chunk) pair four
ways in one process: with reuse (`prefix`: the chunk's stored rows, only the question computed) and
without (`full`: every row computed), each with a query's candidates in one right-padded forward
(chunk_cache.batch) and one prompt per forward. The four run query by query in turn, so a busy machine
slows them alike. The headline is cached-batched against the faster uncached way. The chunks' entries
are read into host memory before the timed scoring (the read is timed on its own: `cache.host_bytes`
must hold them, else the cached side reads from disk, which the figures then include). Also reports
nDCG@10 of the first stage, of the LLM rerank and of a bi-encoder rerank (all-MiniLM-L6-v2) over the
same candidates, on the same queries.
"""

from __future__ import annotations

import time
from typing import Any

from eval.protocols import apply_protocol
from eval.retrieval import score_run
from ragkit.types import Run

WAYS = {"cached batched": (True, True), "cached 1-by-1": (True, False),  # name: (cached, batched)
        "uncached batched": (False, True), "uncached 1-by-1": (False, False)}


def run(pipe, queries: int, depth: int, title: bool = False, bi_encoder: str = "all-MiniLM-L6-v2") -> dict[str, Any]:
    from generators.pointwise import PointwiseScorer
    from retrievers import rerank as stages

    cfg = pipe.config
    subset = pipe.queries()[:queries]
    first = pipe.search(subset)
    best = pipe.best_chunks
    pairs = [(q, [h.id for h in first[q.id][:depth]]) for q in subset]
    chunks = {q.id: [pipe.chunk(best[q.id][d]) for d in docs] for q, docs in pairs}
    warmed = pipe.generator.warm([c for cs in chunks.values() for c in cs], progress=pipe.progress)
    start = time.perf_counter()  # read the entries into host memory first, as a serving process holds them
    rag = pipe.generator
    in_memory = sum(rag.store.get(rag.keys.shared(c.token_ids), upload=False) is not None
                    for cs in chunks.values() for c in cs)
    load_s = time.perf_counter() - start

    def scorer(cached: bool, batched: bool) -> PointwiseScorer:
        return PointwiseScorer(rag, cached=cached, title=title, batch_size=depth if batched else 1)

    q0 = subset[0]
    for cached, batched in WAYS.values():  # untimed warm-up: first-call allocations (the batch room), imports
        scorer(cached, batched).score(q0.text, chunks[q0.id][:depth if cached and batched else 2])
    scorers = {name: scorer(*way) for name, way in WAYS.items()}
    scores: dict[str, dict[str, list[float]]] = {name: {} for name in WAYS}
    padded = dict.fromkeys(WAYS, 0)  # rows a batched forward runs, padding included
    for q, _ in pairs:
        for name, s in scorers.items():
            scores[name][q.id] = s.score(q.text, chunks[q.id])
            rows = [_rows(s, q.text, c) for c in chunks[q.id]]
            padded[name] += len(rows) * max(rows) if WAYS[name][1] else sum(rows)
    reference = scores["uncached 1-by-1"]
    deltas = {name: max(abs(a - b) for q, _ in pairs for a, b in zip(scores[name][q.id], reference[q.id]))
              for name in WAYS}

    bi = stages.BiEncoderReranker(stages.BiEncoderParams(model=bi_encoder, depth=depth), "bench.bi_encoder")
    start = time.perf_counter()
    bi_scores = {q.id: bi.score(q.text, chunks[q.id]) for q, _ in pairs}
    bi_s = time.perf_counter() - start

    qrels = pipe.dataset.qrels
    ndcg = {"first stage": _ndcg(cfg, first, subset, qrels),
            "llm-pointwise": _ndcg(cfg, _reordered(first, pairs, scores["cached batched"]), subset, qrels),
            "bi-encoder": _ndcg(cfg, _reordered(first, pairs, bi_scores), subset, qrels)}
    timing = {name: round(s.stats.seconds, 3) for name, s in scorers.items()}
    rows = {name: round(s.stats.computed_rows / max(1, s.stats.prompts), 1) for name, s in scorers.items()}
    n_pairs = sum(len(cs) for cs in chunks.values())
    baseline = min(("uncached batched", "uncached 1-by-1"), key=timing.get)
    return {"config": cfg.name, "queries": len(subset), "query_ids": [q.id for q in subset], "depth": depth,
            "pairs": n_pairs, "chunks_warmed": warmed, "entries_loaded": in_memory,
            "load_to_memory_s": round(load_s, 3), "rerank_s": timing, "bi_encoder_s": round(bi_s, 3),
            "rows_computed_per_prompt": rows, "rows_run_per_prompt": {k: round(v / n_pairs, 1) for k, v in padded.items()},
            "baseline": baseline,
            "speedup": round(timing[baseline] / timing["cached batched"], 2) if timing["cached batched"] else None,
            "max_abs_score_delta": deltas, "ndcg@10": ndcg,
            "title": title, "model": cfg.generator.model, "dtype": pipe.generator.keys.dtype, **_threads()}


def _rows(scorer, question: str, chunk) -> int:
    """Rows a prompt computes: the question's with reuse (its chunk is warm), every one without."""
    segments = scorer.segments(question, chunk)
    return len(segments[-1].token_ids) if scorer.settings.mode == "prefix" else sum(len(s.token_ids) for s in segments)


def _reordered(first: Run, pairs, scores: dict[str, list[float]]) -> Run:
    """The first-stage run with each query's top documents reordered by `scores`."""
    from retrievers.rerank import reorder

    return Run({q.id: reorder(first[q.id], scores[q.id]) for q, _ in pairs}, name=first.name)


def _ndcg(cfg, run: Run, queries, qrels) -> float:
    run, qrels = apply_protocol(cfg.eval.protocol, run, queries, qrels)
    return round(score_run(run, qrels, ["ndcg@10"])[0]["ndcg@10"], 4)


def _threads() -> dict[str, int]:
    import torch

    return {"torch_threads": torch.get_num_threads()}


def format_report(result: dict[str, Any]) -> str:
    t, d = result["rerank_s"], result["max_abs_score_delta"]
    lines = [f"bench rerank: {result['config']}, {result['queries']} queries x top {result['depth']} = "
             f"{result['pairs']} (query, chunk) pairs{', titles shown' if result['title'] else ''}, "
             f"{result['model']} {result['dtype']}, "
             f"{result['torch_threads']} thread(s)",
             f"  {'':<18}{'rerank s':>10}{'rows/prompt':>13}{'run (padded)':>14}{'max |delta|':>13}",
             *(f"  {name:<18}{t[name]:>10.3f}{result['rows_computed_per_prompt'][name]:>13.1f}"
               f"{result['rows_run_per_prompt'][name]:>14.1f}{d[name]:>13.2e}" for name in t),
             f"  (max |delta|: against uncached 1-by-1)",
             f"  entries read into host memory first: {result['entries_loaded']} in {result['load_to_memory_s']:.1f} s",
             f"  speedup cached batched vs {result['baseline']} (the faster uncached): {result['speedup']}x;  "
             f"vs uncached batched {t['uncached batched'] / t['cached batched']:.2f}x, "
             f"vs uncached 1-by-1 {t['uncached 1-by-1'] / t['cached batched']:.2f}x",
             f"  nDCG@10  first stage {result['ndcg@10']['first stage']:.4f}  llm-pointwise "
             f"{result['ndcg@10']['llm-pointwise']:.4f}  bi-encoder {result['ndcg@10']['bi-encoder']:.4f} "
             f"({result['bi_encoder_s']:.2f} s)"]
    return "\n".join(lines)


__all__ = ["run", "format_report"]
