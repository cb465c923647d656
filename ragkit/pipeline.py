"""Pipeline: corpus -> chunks -> retrievers -> (chunk cache + generator) -> eval -> run folder.

The CLI and the server are thin shells over this class:

    p = Pipeline.from_config("configs/scifact-bm25.toml")
    p.index(); p.retrieve("...", k=10); p.evaluate(); p.ask("...")

Every answer — `ask`, `ask_many`, answer evaluation, `ragkit serve` — is a request submitted to the
one batched engine the pipeline owns (`engine`, generators.engine.AnswerEngine); per-request settings
(mode, token budget, temperature, stop tokens, streaming) travel on the request (`request`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import ragkit
from chunk_cache.primer import choose_primers
from ragkit.config import Config, load_config
from ragkit.errors import IndexMismatchError, InputError, RagkitError
from ragkit.readers import Dataset, open_dataset
from ragkit.index_files import file_checksums, read_chunks, verify_checksums, write_chunks
from ragkit.reranking import SecondStage, score_earlier_stages
from ragkit.storage import atomic_write_json, folder_lock, publish_dir, recover_dir
from ragkit.types import Chunk, Hit, Query, Run, rank_hits

# 2: the manifest lists a sha256 per file, checked on every load.
INDEX_FORMAT = 2
MANIFEST = "manifest.json"
DEFAULT_BATCH = 16  # questions the engine decodes together unless told otherwise


class Pipeline:
    def __init__(self, config: Config, progress: bool = True, skip_bad_lines: bool = False):
        self.config = config
        self.progress = progress
        self.skip_bad_lines = skip_bad_lines
        self._dataset: Dataset | None = None
        self._retrievers: list | None = None
        self._chunks: dict[str, Chunk] | None = None
        self._generator = None
        self._engine = None
        self._second: SecondStage | None = None  # [query] and [rerank] of answering (evaluate makes its own)
        self.best_chunks: dict[str, dict[str, str]] = {}  # set by search(): query -> document -> its best chunk
        random.seed(config.seed)

    @classmethod
    def from_config(cls, path: str | Path, overrides: dict[str, Any] | None = None, progress: bool = True,
                    skip_bad_lines: bool = False) -> "Pipeline":
        return cls(load_config(path, overrides), progress=progress, skip_bad_lines=skip_bad_lines)

    # -- data -------------------------------------------------------------------------------
    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = open_dataset(self.config.dataset, self.config.dataset_path(),
                                         skip_bad_lines=self.skip_bad_lines)
        return self._dataset

    def _tokenizer(self):
        from generators.weights import load_tokenizer

        spec = self.config.chunking.tokenizer
        if spec == "generator":
            return load_tokenizer(self.config.generator.model)
        return load_tokenizer(spec, key="chunking.tokenizer")

    def _bar(self, iterable=None, **kwargs):
        return tqdm(iterable, disable=not self.progress, dynamic_ncols=True, **kwargs)

    # -- indexing ---------------------------------------------------------------------------
    def index(self) -> dict[str, Any]:
        """Chunk the corpus and build every retriever, published to index_dir as one step."""
        from ragkit.chunking import chunk_documents

        cfg = self.config
        dataset = self.dataset
        tokenizer = self._tokenizer()
        started = time.perf_counter()
        docs = self._bar(dataset.documents(), desc="chunking", unit="doc")
        chunks = list(chunk_documents(docs, tokenizer, cfg.chunking.size, cfg.chunking.overlap))
        built = []
        target = cfg.index_dir()
        factory = self._factory()
        with publish_dir(target, lock=True) as tmp:
            write_chunks(tmp / "chunks.jsonl", chunks)
            for position, spec in enumerate(cfg.retrieval.retrievers):
                sub = tmp / f"retriever-{position}"
                sub.mkdir()
                built.append(factory.build(spec, position, chunks, sub,
                                           lambda items, desc: self._bar(items, desc=desc, unit="chunk")))
            manifest = self._manifest(len({c.doc_id for c in chunks}), len(chunks))
            manifest["build_s"] = round(time.perf_counter() - started, 3)
            manifest["files"] = file_checksums(tmp, MANIFEST)
            atomic_write_json(tmp / MANIFEST, manifest)
        if factory.sharded:  # sharded retrievers are opened where they were published
            built = [factory.open(target / f"retriever-{position}", position, spec)
                     for position, spec in enumerate(cfg.retrieval.retrievers)]
        self._retrievers = built
        self._chunks = {c.id: c for c in chunks}
        return {"documents": manifest["documents"], "chunks": len(chunks), "path": str(target),
                "build_s": manifest["build_s"]}

    def _manifest(self, documents: int, chunks: int) -> dict[str, Any]:
        return {
            "format_version": INDEX_FORMAT,
            "ragkit_version": ragkit.__version__,
            "config_hash": self.config.fingerprint(),
            "corpus_fingerprint": self.dataset.fingerprint,
            "documents": documents,
            "chunks": chunks,
            "retrievers": [spec["type"] for spec in self.config.retrieval.retrievers],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _check_manifest(self, folder: Path) -> dict[str, Any]:
        path = folder / "manifest.json"
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise IndexMismatchError(f"{path}: unreadable index manifest ({exc}); rebuild with `ragkit index`") from None
        rebuild = f"rebuild it with `ragkit index` or point retrieval.index_dir elsewhere"
        if manifest.get("format_version") != INDEX_FORMAT:
            raise IndexMismatchError(f"{folder}: index format {manifest.get('format_version')} written by ragkit "
                                     f"{manifest.get('ragkit_version')}, this ragkit reads format {INDEX_FORMAT}; {rebuild}")
        if manifest.get("corpus_fingerprint") != self.dataset.fingerprint:
            raise IndexMismatchError(f"{folder}: index was built from another corpus; {rebuild}")
        if manifest.get("config_hash") != self.config.fingerprint():
            raise IndexMismatchError(f"{folder}: index was built with other dataset/chunking/retriever "
                                     f"settings; {rebuild}")
        verify_checksums(folder, MANIFEST, manifest.get("files"), rebuild)
        return manifest

    def _load_index(self) -> None:
        folder = self.config.index_dir()
        recover_dir(folder, lock=True)
        if folder.parent.exists():
            with folder_lock(folder, shared=True):  # no `ragkit index` swaps the folder while we read it
                if (folder / "manifest.json").exists():
                    self._check_manifest(folder)
                    self._chunks = {c.id: c for c in read_chunks(folder / "chunks.jsonl")}
                    factory = self._factory()
                    self._retrievers = [factory.open(folder / f"retriever-{position}", position, spec)
                                        for position, spec in enumerate(self.config.retrieval.retrievers)]
                    return
        self.index()

    def _factory(self):
        from retrievers.factory import RetrieverFactory

        cfg = self.config
        return RetrieverFactory(cfg.cluster, cfg.sharded(), cfg.index.budget_bytes(), progress=self.progress)

    @property
    def retrievers(self) -> list:
        if self._retrievers is None:
            self._load_index()
        return self._retrievers

    def chunk(self, chunk_id: str) -> Chunk:
        if self._chunks is None:
            self._load_index()
        return self._chunks[chunk_id]

    def chunk_text(self, chunk_id: str) -> str:
        return self.chunk(chunk_id).text

    # -- retrieval --------------------------------------------------------------------------
    def retrieve_batch(self, texts: list[str], k: int, filter: dict | None = None) -> list[list[Hit]]:
        """Top-k chunk hits per text; several retrievers are fused as configured."""
        import retrievers

        r = self.config.retrieval
        if len(self.retrievers) == 1:
            return self.retrievers[0].search(texts, k, filter=filter)
        depth = max(k, r.chunk_k)
        rankings = [ret.search(texts, depth, filter=filter) for ret in self.retrievers]
        return retrievers.fuse(rankings, method=r.fusion, k=k, rrf_k=r.rrf_k, weights=r.weights or None,
                               normalization=r.normalization)

    def retrieve(self, question: str, k: int = 10, filter: dict | None = None) -> list[Hit]:
        return self.retrieve_batch([question], k, filter=filter)[0]

    def search(self, queries: list[Query], batch_size: int = 64, texts: list[str] | None = None) -> Run:
        """Document-level run: chunk hits folded to their documents by max score (MaxP). `texts` replaces
        the queries' texts for retrieval (an expansion); `best_chunks[qid][doc_id]` keeps each document's
        best chunk (what a reranker reads)."""
        r = self.config.retrieval
        texts = [q.text for q in queries] if texts is None else texts
        rankings: dict[str, list[Hit]] = {}
        self.best_chunks = {}
        bar = self._bar(total=len(queries), desc="retrieving", unit="q")
        for start in range(0, len(queries), batch_size):
            batch = queries[start:start + batch_size]
            hits = self.retrieve_batch(texts[start:start + batch_size], max(r.chunk_k, r.k))
            for query, chunk_hits in zip(batch, hits):
                best: dict[str, float] = {}
                chunk_of = self.best_chunks[query.id] = {}
                for hit in chunk_hits:
                    doc_id = Chunk.doc_id_of(hit.id)
                    if hit.score > best.get(doc_id, float("-inf")):
                        best[doc_id], chunk_of[doc_id] = hit.score, hit.id
                rankings[query.id] = rank_hits(best, r.k)
            bar.update(len(batch))
        bar.close()
        return Run(rankings, name=self.config.name)

    # -- evaluation -------------------------------------------------------------------------
    def queries(self) -> list[Query]:
        """The dataset's judged queries (the reader applies dataset.limit_queries)."""
        return self.dataset.queries

    def evaluate(self, answers: bool | None = None, reference: str | None = None) -> dict[str, Any]:
        """Run every query, score it by the configured protocol and write runs/<name>/.

        With `answers` (default: whether the config has a [generator] section or `reference` is given)
        every query is also answered from its top chunks and the answers scored (ragkit.answering);
        `reference` names a cache mode (e.g. "full") the answers are compared against."""
        from eval.generation import merge_scores
        from eval.protocols import apply_protocol
        from eval.retrieval import score_run
        from eval.runs import make_results, write_run

        if self.config.tasks:
            return self._evaluate_suite(answers, reference)
        cfg = self.config
        answers = (cfg.has_generator or reference is not None) if answers is None else answers
        qrels = self.dataset.qrels
        if qrels is None:
            raise InputError(cfg.dataset_path(), "this dataset has no relevance judgements (qrels) to evaluate against")
        t0 = time.perf_counter()
        loaded = self.retrievers
        t_index = time.perf_counter() - t0
        queries = self.queries()
        # [query] expansion and [rerank] stages (ragkit.reranking); answers retrieve through them too
        second = self._second = SecondStage(self)
        texts = second.texts(queries)
        t1 = time.perf_counter()
        run = self.search(queries, texts=texts)
        t_search = time.perf_counter() - t1
        stages = [("retrieval", run)] + second.rerank(queries, run, self.best_chunks)
        run, scored_qrels = apply_protocol(cfg.eval.protocol, stages[-1][1], queries, qrels)
        aggregate, per_query = score_run(run, scored_qrels, cfg.eval.metrics)
        aggregate, per_query, stage_runs = score_earlier_stages(stages[:-1], cfg.eval.protocol, queries, qrels,
                                                                cfg.eval.metrics, aggregate, per_query)
        timings = {"index_load_or_build_s": round(t_index, 3), "search_s": round(t_search, 3),
                   "qps": round(len(queries) / t_search, 2) if t_search > 0 else None, **second.timings}
        counts = {"queries": len(queries), "scored_queries": len(per_query),
                  "retrievers": len(loaded), "chunks": len(self._chunks or {}),
                  "unjudged_queries_dropped": self.dataset.dropped_queries,
                  "bad_lines_skipped": self.dataset.skipped.total}
        extra: dict[str, Any] = {"stages": [label for label, _ in stages]} if second.active else {}
        answered = None
        if answers:
            from ragkit.answering import ENDPOINT_MODE, evaluate_answers

            answered = evaluate_answers(self, queries, reference)
            aggregate, per_query = merge_scores((aggregate, per_query), (answered.aggregate, answered.per_query))
            timings.update(answered.timings)
            counts.update(answered.counts)
            extra.update(cache_mode=ENDPOINT_MODE if cfg.generator.backend == "openai" else cfg.cache.mode,
                         reference_mode=reference)
        counts.update(second.summary())
        config_dict = cfg.to_dict()
        results = make_results(
            cfg.name, cfg.eval.protocol, aggregate, per_query, config_dict,
            ragkit_version=ragkit.__version__, corpus_fingerprint=self.dataset.fingerprint, seed=cfg.seed,
            timings=timings, counts=counts, index_config_hash=cfg.fingerprint(), **extra,
        )
        run_dir = cfg.run_dir()
        write_run(run_dir, run, results, config_dict, answered.records if answered else None, stage_runs)
        return {**results, "run_dir": str(run_dir)}

    def _evaluate_suite(self, answers: bool | None, reference: str | None) -> dict[str, Any]:
        """Evaluate each task of `tasks` into runs/<name>/<task>/; runs/<name>/suite.json holds their average."""
        from eval.runs import suite_summary

        results, skipped = [], {}
        for task_config in self.config.task_configs():
            task = Pipeline(task_config, progress=self.progress, skip_bad_lines=self.skip_bad_lines)
            results.append(task.evaluate(answers, reference))
            if task.dataset.skipped.total:
                skipped[task_config.task] = task.dataset.skipped.summary()
        summary = suite_summary(self.config.name, results)
        atomic_write_json(self.config.run_dir() / "suite.json", summary)
        return {**summary, "aggregate": summary["average"], "skipped": skipped, "run_dir": str(self.config.run_dir())}

    # -- answering ----------------------------------------------------------------------------
    @property
    def generator(self):
        if self._generator is None:
            from generators.rag import RagGenerator

            self._generator = RagGenerator({**dataclasses.asdict(self.config.generator), "seed": self.config.seed},
                                           dataclasses.asdict(self.config.cache))
        return self._generator

    @property
    def engine(self):
        """The batched engine every answer goes through (loads the model on first use)."""
        if self._engine is None:
            from generators.engine import AnswerEngine

            self._engine = AnswerEngine(self.generator, max_batch=DEFAULT_BATCH)
        return self._engine

    def request(self, question: str, chunks: list[Chunk], **settings):
        """An engine request: `settings` are Request fields (mode, max_new_tokens, temperature, stop_ids,
        on_token, keep_logits, forced); what is not given is the config's."""
        from generators.engine import Request

        return Request(question, chunks, **settings)

    def answer(self, requests: list, grouped: bool = True, on_answer=None) -> list:
        """Answer requests through the engine; answers in request order. `grouped`: questions sharing chunks
        run together (else in the given order, each planned after the ones before it were stored).
        on_answer(index, answer) as each is done."""
        return self.engine.run(requests, grouped=grouped, on_answer=on_answer)

    @property
    def second_stage(self) -> SecondStage:
        if self._second is None:
            self._second = SecondStage(self)
        return self._second

    def chunks_for(self, questions: list[str], batch_size: int = 64, k: int | None = None) -> list[list[Chunk]]:
        """The top `k` (default `generator.chunks`) chunks of each question: what its answer is given.
        The question is retrieved as `[query]` expands it and its chunks reordered by the `[rerank]` stages."""
        return [[self.chunk(h.id) for h in hits] for hits in self.answer_hits(questions, batch_size, k)]

    def answer_hits(self, questions: list[str], batch_size: int = 64, k: int | None = None) -> list[list[Hit]]:
        """Chunk hits of `chunks_for` (reranked hits score by rank)."""
        k = self.config.generator.chunks if k is None else k
        second = self.second_stage
        texts = second.texts([Query(str(i), q) for i, q in enumerate(questions)])
        found = []
        for start in range(0, len(questions), batch_size):
            batch = zip(questions[start:start + batch_size],
                        self.retrieve_batch(texts[start:start + batch_size], max(k, second.depth)))
            found.extend(second.rerank_chunks(question, hits)[:k] for question, hits in batch)
        return found

    def ask(self, question: str, on_token=None):
        """Retrieve the top `generator.chunks` chunks and answer from them, reusing their KV (in closed form,
        the best of generator.choices, when the config sets them)."""
        chunks = self.chunks_for([question])[0]
        if self.config.generator.choices:
            return self.generator.choose(question, chunks)
        return self.answer([self.request(question, chunks, on_token=on_token)])[0]

    def ask_many(self, questions: list[str], on_token=None, batch_size: int = 16) -> list:
        """Answer many questions: one batched retrieval, then the batched engine (questions sharing chunks run
        together, decoding is batched); answers in question order. on_token(index, text) streams them."""
        requests = [self.request(q, chunks, on_token=None if on_token is None else functools.partial(on_token, i))
                    for i, (q, chunks) in enumerate(zip(questions, self.chunks_for(questions)))]
        if self.engine.idle:
            self.engine.max_batch = batch_size
        return self.answer(requests)

    def prompt_fits(self, question: str, chunks: list[Chunk], max_new_tokens: int | None = None) -> tuple[int, int]:
        """(tokens the prompt and its answer need, the model's context length): the engine refuses a request
        past it; answer evaluation checks every query first, to name the one that does not fit."""
        budget = self.config.generator.max_new_tokens if max_new_tokens is None else max_new_tokens
        return self.generator.prompt.size(question, chunks) + budget, self.generator.info.context_length

    def question_room(self, k: int, max_new_tokens: int) -> int:
        """Tokens a question may take so that a prompt of `k` chunks of chunking.size and its answer fit."""
        prompt = self.generator.prompt
        return prompt.room(self.generator.info.context_length, k * prompt.chunk_allowance(self.config.chunking.size),
                           max_new_tokens)

    def token_counter(self):
        """A function text -> token count with its own tokenizer (fast tokenizers are not safe to share
        between threads: a server counts on its event loop while the engine's thread tokenizes)."""
        from generators.weights import load_tokenizer

        tokenizer = load_tokenizer(self.config.generator.model)
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def cache_stats(self) -> dict[str, Any]:
        """The KV store's hit rate and bytes per tier."""
        stats = self.generator.store.stats()
        return {"hit_rate": stats["hit_rate"], "tiers": {name: tier["bytes"] for name, tier in stats["tiers"].items()}}

    def flush(self) -> None:
        """Every chunk the KV store holds for disk written, and its hit counts in the disk journal."""
        if self._generator is not None:
            self._generator.store.flush()

    def close(self) -> None:
        """Stop the engine's prefetch thread and flush the KV store."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self.flush()

    def warm_cache(self, top: int | None = None, queries: list[str] | None = None) -> int:
        """Precompute chunk KV: every chunk, or the chunks retrieved for `queries` (default: the dataset's),
        the `top` most often retrieved first. Returns how many were computed."""
        if self._chunks is None:
            self._load_index()
        if top or queries is not None:
            texts = [q.text for q in self.queries()] if queries is None else queries
            counts: dict[str, int] = {}
            for hits in self.retrieve_batch(texts, self.config.generator.chunks):
                for hit in hits:
                    counts[hit.id] = counts.get(hit.id, 0) + 1
            ids = sorted(counts, key=lambda cid: (-counts[cid], cid))[:top]
            chunks = [self._chunks[cid] for cid in ids]
        else:
            chunks = list(self._chunks.values())
        return self.generator.warm(chunks, progress=self.progress, primers=self.primers())

    def primers(self) -> list[Chunk]:
        """The corpus passages warms store each chunk behind too (chunk_cache.primer; cache.primer_passages)."""
        if self._chunks is None:
            self._load_index()
        return choose_primers(self._chunks.values(), self.config.cache.primer_passages)

    def query_log(self, source: str) -> list[str]:
        """Question texts from a query-log file, or from a split of this config's dataset (e.g. "dev")."""
        from ragkit.readers.querylog import read_query_log

        if Path(source).is_file():
            return read_query_log(Path(source))
        dataset = dataclasses.replace(self.config.dataset, split=source, limit_queries=0)
        try:
            queries = Pipeline(dataclasses.replace(self.config, dataset=dataset), progress=False).queries()
        except InputError as exc:
            raise InputError(source, f"neither a query-log file nor a split of the dataset ({exc})") from None
        return [q.text for q in queries]


__all__ = ["Pipeline", "RagkitError"]
