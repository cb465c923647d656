"""Pipeline: corpus -> chunks -> retrievers -> (chunk cache + generator) -> eval -> run folder.

The CLI is a thin shell over this class:

    p = Pipeline.from_config("configs/scifact-bm25.toml")
    p.index(); p.retrieve("...", k=10); p.evaluate(); p.ask("...")
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

import ragkit
from ragkit.config import Config, load_config
from ragkit.errors import IndexMismatchError, InputError, RagkitError
from ragkit.readers import Dataset, open_dataset
from ragkit.reranking import SecondStage, score_earlier_stages
from ragkit.storage import atomic_write_json, folder_lock, hash_file, publish_dir, recover_dir
from ragkit.types import Chunk, Hit, Query, Run, rank_hits

# 2: the manifest lists a sha256 per file, checked on every load.
INDEX_FORMAT = 2
MANIFEST = "manifest.json"


class Pipeline:
    def __init__(self, config: Config, progress: bool = True, skip_bad_lines: bool = False):
        self.config = config
        self.progress = progress
        self.skip_bad_lines = skip_bad_lines
        self._dataset: Dataset | None = None
        self._retrievers: list | None = None
        self._chunks: dict[str, Chunk] | None = None
        self._generator = None
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
        import retrievers
        from ragkit.chunking import chunk_documents

        cfg = self.config
        dataset = self.dataset
        tokenizer = self._tokenizer()
        started = time.perf_counter()
        docs = self._bar(dataset.documents(), desc="chunking", unit="doc")
        chunks = list(chunk_documents(docs, tokenizer, cfg.chunking.size, cfg.chunking.overlap))
        built = []
        target = cfg.index_dir()
        plan = self._build_plan() if cfg.sharded() else None
        with publish_dir(target, lock=True) as tmp:
            _write_chunks(tmp / "chunks.jsonl", chunks)
            for position, spec in enumerate(cfg.retrieval.retrievers):
                sub = tmp / f"retriever-{position}"
                sub.mkdir()
                if plan is not None:
                    self._build_sharded(spec, position, chunks, sub, plan)
                    continue
                retriever = retrievers.build(spec, position)
                retriever.index(self._bar(chunks, desc=f"indexing {spec['type']}", unit="chunk"))
                retriever.save(sub)
                built.append(retriever)
            manifest = self._manifest(len({c.doc_id for c in chunks}), len(chunks))
            manifest["build_s"] = round(time.perf_counter() - started, 3)
            manifest["files"] = _file_checksums(tmp)
            atomic_write_json(tmp / MANIFEST, manifest)
        if plan is not None:  # sharded retrievers are opened where they were published
            built = [self._load_retriever(target, position, spec)
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
        _verify_checksums(folder, manifest.get("files"), rebuild)
        return manifest

    def _load_index(self) -> None:
        folder = self.config.index_dir()
        recover_dir(folder, lock=True)
        if folder.parent.exists():
            with folder_lock(folder, shared=True):  # no `ragkit index` swaps the folder while we read it
                if (folder / "manifest.json").exists():
                    self._check_manifest(folder)
                    self._chunks = {c.id: c for c in _read_chunks(folder / "chunks.jsonl")}
                    self._retrievers = [self._load_retriever(folder, position, spec)
                                        for position, spec in enumerate(self.config.retrieval.retrievers)]
                    return
        self.index()

    # -- scale-out ---------------------------------------------------------------------------
    def _runner(self):
        if self.config.cluster.backend == "ray":
            from retrievers import ray_backend

            return ray_backend.RayRunner(self.config.cluster, progress=self.progress)
        from retrievers.shards import LocalRunner

        return LocalRunner(progress=self.progress)

    def _build_plan(self):
        from retrievers.shards import BuildPlan

        return BuildPlan(shards=self.config.cluster.shards, memory_budget=self.config.index.budget_bytes(),
                         runner=self._runner())

    def _build_sharded(self, spec: dict[str, Any], position: int, chunks: list[Chunk], folder: Path, plan) -> None:
        """Stream one retriever into shards: embeddings first (resumable) for the dense kinds."""
        from retrievers import shards

        embeddings = shards.embed(spec, position, chunks, plan) if spec["type"] in shards.DENSE_KINDS else None
        shards.build(spec, position, chunks, folder, plan, embeddings)

    def _load_retriever(self, folder: Path, position: int, spec: dict[str, Any]):
        import retrievers

        sub = folder / f"retriever-{position}"
        pool = None
        if self.config.cluster.backend == "ray":
            from retrievers import ray_backend

            pool = ray_backend.actor_pool(self.config.cluster)
        try:
            if self.config.sharded():
                from retrievers.shards import ShardedRetriever

                return ShardedRetriever(spec, position, sub, pool)
            retriever = retrievers.build(spec, position)
            retriever.load(sub)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # files that pass checksums yet do not parse
            raise IndexMismatchError(f"{sub}: unreadable index ({type(exc).__name__}: {exc}); "
                                     "rebuild it with `ragkit index`") from None
        return retriever

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
        second = SecondStage(self)  # [query] expansion and [rerank] stages (ragkit.reranking)
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

    # -- generation -------------------------------------------------------------------------
    @property
    def generator(self):
        if self._generator is None:
            from generators.rag import RagGenerator

            self._generator = RagGenerator({**dataclasses.asdict(self.config.generator), "seed": self.config.seed},
                                           dataclasses.asdict(self.config.cache))
        return self._generator

    def ask(self, question: str, on_token=None):
        """Retrieve the top `generator.chunks` chunks and answer from them, reusing their KV (in closed form,
        the best of generator.choices, when the config sets them)."""
        hits = self.retrieve(question, k=self.config.generator.chunks)
        chunks = [self.chunk(h.id) for h in hits]
        if self.config.generator.choices:
            return self.generator.choose(question, chunks)
        return self.generator.answer(question, chunks, on_token=on_token)

    def ask_many(self, questions: list[str], on_token=None, batch_size: int = 16) -> list:
        """Answer many questions: one batched retrieval, then the batched engine (questions sharing chunks run
        together, decoding is batched); answers in question order. on_token(index, text) streams them."""
        from generators.engine import AnswerEngine, Request

        hits = self.retrieve_batch(questions, k=self.config.generator.chunks)
        requests = [Request(q, [self.chunk(h.id) for h in found],
                            on_token=None if on_token is None else functools.partial(on_token, i))
                    for i, (q, found) in enumerate(zip(questions, hits))]
        engine = AnswerEngine(self.generator, max_batch=batch_size)
        try:
            return engine.run(requests)
        finally:
            engine.close()

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
        return self.generator.warm(chunks, progress=self.progress)

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


def _write_chunks(path: Path, chunks: list[Chunk]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for c in chunks:
            fh.write(json.dumps({"id": c.id, "doc_id": c.doc_id, "text": c.text, "title": c.title,
                                 "token_ids": list(c.token_ids), "span": list(c.span), "hash": c.content_hash,
                                 "metadata": dict(c.metadata)}, ensure_ascii=False) + "\n")


def _file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the manifest itself excepted), by relative path."""
    return {path.relative_to(folder).as_posix(): _sha256(path)
            for path in sorted(folder.rglob("*")) if path.is_file() and path != folder / MANIFEST}


def _sha256(path: Path) -> str:
    return hash_file(path, hashlib.sha256())


def _verify_checksums(folder: Path, files: Any, rebuild: str) -> None:
    """A file changed, truncated or removed since `ragkit index` wrote it is never read."""
    if not isinstance(files, dict) or not files:
        raise IndexMismatchError(f"{folder / MANIFEST}: no file checksums in the index manifest; {rebuild}")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise IndexMismatchError(f"{path}: missing from the index; {rebuild}")
        if _sha256(path) != expected:
            raise IndexMismatchError(f"{path}: checksum mismatch, the file changed after `ragkit index` "
                                     f"wrote it; {rebuild}")


def _read_chunks(path: Path) -> Iterator[Chunk]:
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                try:
                    r = json.loads(line)
                    yield Chunk(r["id"], r["doc_id"], r["text"], tuple(r["token_ids"]), tuple(r["span"]),
                                r["hash"], r.get("title", ""), r.get("metadata", {}))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise IndexMismatchError(f"{path}:{line_no}: damaged chunk record ({exc}); "
                                             "rebuild with `ragkit index`") from None
    except FileNotFoundError:
        raise IndexMismatchError(f"{path}: missing; rebuild with `ragkit index`") from None


__all__ = ["Pipeline", "RagkitError"]
