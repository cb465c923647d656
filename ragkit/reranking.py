"""The second stage of an eval or a search: LLM query expansion before retrieval, rerank stages after.

`SecondStage(pipe)` builds what the config asks for, lazily: the [llm] (the local decoder or an
endpoint) behind an on-disk reply cache, and one reranker per `[[rerank.stages]]` table. `texts`
gives each query's retrieval text (expanded or not); `rerank` runs the stages in order over a
document run and returns every stage's run, so that `Pipeline.evaluate` scores the first stage and
each later one side by side; `rerank_chunks` runs them over one question's chunk hits, for answering
(`Pipeline.chunks_for`: ask, ask_many, serve and eval's answers). LLM pointwise scores are cached on
disk like replies, keyed by the model fingerprint and the prompt's token ids; `counts` says how many
prompts the LLM actually saw.
"""

from __future__ import annotations

import time
from typing import Any

from tqdm.auto import tqdm

from ragkit.types import Hit, Query, Run


class SecondStage:
    def __init__(self, pipe):
        self.pipe = pipe
        self.config = pipe.config
        self._llm = None
        self._rerankers = None
        self.counts: dict[str, int] = {}
        self.timings: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return bool(self.config.rerank.stages) or self.config.query.expansion != "none"

    @property
    def llm(self):
        """The [llm], replies cached under llm.cache_dir."""
        if self._llm is None:
            from generators.llm import CachedLLM

            self._llm = CachedLLM(make_llm(self.pipe), self.config.llm.cache_dir)
        return self._llm

    # -- before retrieval ---------------------------------------------------------------------
    def texts(self, queries: list[Query]) -> list[str]:
        """What each query is retrieved with: its text, or its expansion."""
        kind = self.config.query.expansion
        if kind == "none":
            return [q.text for q in queries]
        from generators.expansion import expand

        start = time.perf_counter()
        texts = expand(self.llm, kind, [q.text for q in queries], self.config.query.max_tokens)
        self.timings["expansion_s"] = round(time.perf_counter() - start, 3)
        return texts

    # -- after retrieval ----------------------------------------------------------------------
    @property
    def rerankers(self) -> list[tuple[str, Any, Any]]:
        """(label, reranker, params) per `[[rerank.stages]]` table, built once (a model loads once)."""
        if self._rerankers is None:
            from retrievers import rerank as stages

            llm_kinds = {"llm-pointwise": self._pointwise, "llm-listwise": self._listwise}
            self._rerankers = []
            for position, spec in enumerate(self.config.rerank.stages):
                reranker, params = stages.build(spec, position, llm_kinds)
                self._rerankers.append((f"{spec['type']}@{params.depth}", reranker, params))
        return self._rerankers

    @property
    def depth(self) -> int:
        """Candidates the stages read: retrieve at least this many."""
        return max((params.depth for _label, _reranker, params in self.rerankers), default=0)

    def rerank(self, queries: list[Query], run: Run, best_chunks: dict[str, dict[str, str]]) -> list[tuple[str, Run]]:
        """(label, run) after each stage; `best_chunks[qid][doc_id]` is the chunk a document is judged by."""
        from retrievers import rerank as stages

        results = []
        for position, (label, reranker, params) in enumerate(self.rerankers):
            start = time.perf_counter()
            rankings = {}
            for query in tqdm(queries, desc=f"reranking ({label})", unit="q", disable=not self.pipe.progress):
                chunk_ids = best_chunks.get(query.id, {})
                rankings[query.id] = stages.rerank(reranker, query.text, run.get(query.id, []), params.depth,
                                                   lambda doc_id: self.pipe.chunk(chunk_ids[doc_id]))
            self.timings[f"rerank_{position}_s"] = round(time.perf_counter() - start, 3)
            run = Run(rankings, name=run.name)
            results.append((label, run))
        return results

    def rerank_chunks(self, question: str, hits: list[Hit]) -> list[Hit]:
        """A question's chunk hits through every stage: what its answer is given."""
        from retrievers import rerank as stages

        for _label, reranker, params in self.rerankers:
            hits = stages.rerank(reranker, question, hits, params.depth, self.pipe.chunk)
        return hits

    def _pointwise(self, params) -> "CachedPointwise":
        from generators.pointwise import PointwiseScorer

        return CachedPointwise(PointwiseScorer(self.pipe.generator, cached=params.cached, title=params.title,
                                               batch_size=params.batch_size), self)

    def _listwise(self, params):
        from generators.listwise import ListwiseReranker

        return ListwiseReranker(self.llm, params.window, params.step, params.max_tokens, params.chars)

    def summary(self) -> dict[str, int]:
        counts = dict(self.counts)
        if self._llm is not None:
            counts["llm_calls"] = counts.get("llm_calls", 0) + self._llm.calls
            counts["llm_cache_hits"] = counts.get("llm_cache_hits", 0) + self._llm.hits
        return counts


class CachedPointwise:
    """A PointwiseScorer whose scores are kept on disk by (model identity, prompt token ids)."""

    def __init__(self, scorer, stage: SecondStage):
        from generators.llm import DiskCache

        self.scorer, self.stage = scorer, stage
        self.cache = DiskCache(stage.config.llm.cache_dir)
        self.identity = f"local:{scorer.rag.fingerprint}:{scorer.rag.keys.dtype}"

    def score(self, query: str, chunks) -> list[float]:
        keys = [["pointwise", self.identity, self.scorer.prompt_ids(query, c)] for c in chunks]
        scores = [self.cache.get(k) for k in keys]
        todo = [i for i, s in enumerate(scores) if s is None]
        counts = self.stage.counts
        counts["llm_cache_hits"] = counts.get("llm_cache_hits", 0) + len(chunks) - len(todo)
        counts["llm_calls"] = counts.get("llm_calls", 0) + len(todo)
        for i, score in zip(todo, self.scorer.score(query, [chunks[i] for i in todo])):
            self.cache.put(keys[i], score)
            scores[i] = score
        return scores


def make_llm(pipe) -> Any:
    """The [llm] section's LLM, uncached: an endpoint client or the local generator's decoder."""
    cfg = pipe.config.llm
    if cfg.backend == "openai":
        from generators.endpoint import EndpointLLM

        return EndpointLLM(cfg.base_url, cfg.model, cfg.api_key_env, cfg.concurrency, cfg.timeout, cfg.retries)
    from generators.llm import LocalLLM

    return LocalLLM(pipe.generator)


def score_earlier_stages(stages: list[tuple[str, Run]], protocol: str, queries: list[Query], qrels, metrics: list[str],
                         aggregate: dict[str, float], per_query: dict[str, dict[str, float]]):
    """Score every stage but the last (already scored) beside the final metrics: the first as
    "first_stage_<metric>", later ones as "stage<i>_<metric>". Returns (aggregate, per_query, runs by file label)."""
    from eval.generation import merge_scores
    from eval.protocols import apply_protocol
    from eval.retrieval import score_run

    runs = {}
    for position, (_label, run) in enumerate(stages):
        prefix = "first_stage_" if position == 0 else f"stage{position}_"
        run, scored_qrels = apply_protocol(protocol, run, queries, qrels)
        stage_aggregate, stage_per_query = score_run(run, scored_qrels, metrics)
        aggregate, per_query = merge_scores(
            (aggregate, per_query), ({f"{prefix}{k}": v for k, v in stage_aggregate.items()},
                                     {q: {f"{prefix}{k}": v for k, v in m.items()} for q, m in stage_per_query.items()}))
        runs[prefix.rstrip("_")] = run
    return aggregate, per_query, runs


__all__ = ["SecondStage", "make_llm", "score_earlier_stages"]
