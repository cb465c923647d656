"""`ragkit bench ...`: the benchmark commands. Each parses its options into the bench's settings and
prints what the bench returns, side by side, as a table or JSON (the benches live beside this module)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ragkit.bench import BenchOptions
from ragkit.shell import JsonOpt, QuietOpt, SetOpt, emit, load, log, modes_option, open_pipeline, user_errors

bench_app = typer.Typer(help="Benchmarks: side-by-side measurements printed as a table or JSON.", no_args_is_help=True)
ANSWER_MODES = "full,prefix,naive,blend,craft"


def _default_cache_modes() -> str:
    from ragkit.config import MODE_NAMES

    return ",".join([*MODE_NAMES, "blend@0.05"])


@bench_app.command("cache")
@user_errors
def bench_cache(
    config: Path = typer.Argument(Path("configs/musique-blend.toml"), help="Generator + cache settings."),
    as_json: bool = JsonOpt,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="MuSiQue questions for workload (a); all 150 "
                                        "by default (a full-prefill TTFT is ~50 s per question on one CPU core)."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip the first N questions: blend's defaults were tuned "
                               "on the first 24, so --offset 24 is the held-out run."),
    chunks: int = typer.Option(10, "--chunks", min=1, help="Passages per question in workload (a)."),
    sweep_questions: int = typer.Option(2, "--sweep-questions", min=0, help="Questions per point of the 5/10/20 "
                                        "x 256-token sweep (0 skips it)."),
    requests: int = typer.Option(40, "--requests", min=0, help="Requests in workload (b) (0 skips it)."),
    cap_mib: int = typer.Option(256, "--cap-mib", min=1, help="Host cache budget in workload (b), MiB."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="Also write one run folder per mode "
                                            "(answers, EM/F1, TTFT, KL, agreement) for `ragkit report`."),
    modes: str = typer.Option(None, "--modes", show_default="every mode and blend@0.05",
                              help="Comma-separated modes for workload (a); blend@R runs blend at ratio R "
                              "(e.g. blend@0.5), query@Nt query with N recomputed rows. full always runs: it is the "
                              "reference. With --frontier: the selectors to sweep over --budgets (SELECTOR@R adds one point)."),
    frontier: bool = typer.Option(False, "--frontier", help="Sweep each selector of --modes over --budgets against "
                                  "full prefill (bootstrap 95% intervals); write frontier.json and frontier.png "
                                  "(speedup vs KL) to --out. Skips the other workloads."),
    budgets: str = typer.Option("0.05,0.1,0.2,0.3", "--budgets", help="With --frontier: shares of reused rows."),
    out: Path = typer.Option(Path("runs/frontier"), "--out", help="With --frontier: folder for the plot and JSON."),
    musique: Path = typer.Option(Path("data/musique/musique_s.json.gz"), "--musique", help="The MuSiQue sample "
                                 "(JSON list of {question, answers, ctxs}) for workload (a)."),
    stream_config: Path = typer.Option(Path("configs/scifact-bm25.toml"), "--stream-config", help="Pipeline whose "
                                       "queries and retrieved chunks make workload (b)'s request stream."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads (1 was fastest on a shared 2-core CPU)."),
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Reuse modes side by side: TTFT, recompute, agreement with full prefill; (b) recurring SciFact chunks."""
    from ragkit.bench import cache as bench

    settings = bench.CacheBenchSettings(
        musique=musique, limit=limit, offset=offset, modes=(modes or _default_cache_modes()).split(","), chunks=chunks,
        sweep_questions=sweep_questions, requests=requests, cap_bytes=cap_mib << 20, stream_config=stream_config,
        runs_dir=runs_dir)
    options = BenchOptions(threads=threads, log=log)
    if frontier:
        import torch

        from ragkit.bench import frontier as sweep
        from ragkit.errors import InputError

        if not musique.is_file():
            raise InputError(musique, "MuSiQue sample not found", hint="run from the ragkit checkout or pass --musique")
        torch.set_num_threads(threads)
        emit(sweep.cli_frontier(load(config, overrides), musique, limit, offset, chunks, modes or "blend,query",
                                budgets, out, log), as_json, sweep.format_frontier)
        return
    bench.check_variants(settings.modes)
    emit(bench.run_from_config(load(config, overrides), settings, options), as_json, bench.format_report)


@bench_app.command("store")
@user_errors
def bench_store(
    as_json: bool = JsonOpt,
    tokens: Optional[List[int]] = typer.Option(None, "--tokens", min=1, help="Entry length in tokens (repeatable; "
                                               "default 128, 512 and 2048)."),
    entries: int = typer.Option(4, "--entries", min=1, help="Entries per length."),
) -> None:
    """KV store costs per entry: put, verified disk get, sha256, plain file read, host hit (synthetic KV)."""
    from ragkit.bench import store as bench

    result = bench.run(tokens=tuple(tokens or (128, 512, 2048)), entries=entries, threads=1)
    emit(result, as_json, bench.format_report)


@bench_app.command("retrieval")
@user_errors
def bench_retrieval(
    as_json: bool = JsonOpt,
    quick: bool = typer.Option(False, "--quick", help="Smoke run: 300 SciFact documents, 30 queries, 20k-chunk "
                               "scale set."),
    scale: Optional[int] = typer.Option(None, "--scale", min=1, help="Chunks in the scale set (default 200,000)."),
    reference_queries: int = typer.Option(100, "--reference-queries", min=1, help="Queries timed for rank-bm25 "
                                          "(it scores every document in Python)."),
    data: Path = typer.Option(Path("data/scifact"), "--data", help="SciFact in BEIR layout (corpus.jsonl.gz, "
                              "queries.jsonl, qrels/test.tsv)."),
) -> None:
    """BM25 vs raw bm25s / rank-bm25, dense exact vs HNSW vs IVF-PQ vs raw FAISS, on SciFact and a 200k scale set."""
    from ragkit.bench.retrieval import format_report, run_retrieval_bench
    from ragkit.errors import InputError

    if not (data / "corpus.jsonl.gz").is_file():
        raise InputError(data, "no SciFact corpus.jsonl.gz here", hint="run from the ragkit checkout or pass --data")
    docs, queries, default_scale = (300, 30, 20_000) if quick else (0, 0, 200_000)
    result = run_retrieval_bench(data, docs, queries, scale or default_scale, min(reference_queries, queries or 10**9),
                                 log=log)
    emit(result, as_json, format_report)


def _rates(value: str) -> str:
    try:
        rates = [float(r) for r in value.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{value!r}: comma-separated request rates per second, e.g. 0.05,0.1,0.2") from None
    if not rates or min(rates) <= 0:
        raise typer.BadParameter("request rates must be > 0")
    return value


@bench_app.command("serve")
@user_errors
def bench_serve(
    as_json: bool = JsonOpt,
    rates: str = typer.Option("0.05,0.1,0.2,0.4", "--rates", callback=_rates, help="Request rates (per second) to "
                              "offer, comma-separated; each runs for --duration."),
    modes: str = typer.Option("full,prefix,blend", "--modes", callback=modes_option(), help="Reuse modes, one fresh "
                              "server each."),
    duration: float = typer.Option(120.0, "--duration", min=1.0, help="Seconds of arrivals per rate."),
    max_requests: int = typer.Option(500, "--max-requests", min=1, help="Most requests per rate."),
    k: int = typer.Option(3, "--k", min=1, help="Chunks per answer."),
    chunk_size: int = typer.Option(256, "--chunk-size", min=16, help="Tokens per chunk of the bench's index."),
    max_tokens: int = typer.Option(8, "--max-tokens", min=1, help="Answer tokens per request."),
    queue: int = typer.Option(32, "--queue", min=1, help="The server's queue bound (beyond it: 429)."),
    deadline: float = typer.Option(120.0, "--deadline", min=1.0, help="The server's per-request deadline, s."),
    slo: float = typer.Option(10.0, "--slo", min=0.1, help="p90 TTFT bound (s) for blend_rps_vs_full_at_equal_p90."),
    workdir: Path = typer.Option(Path(".ragkit/bench-serve"), "--workdir", help="Corpus, index and server logs."),
    seed: int = typer.Option(0, "--seed", help="Arrival times and question draws."),
    threads: int = typer.Option(0, "--threads", min=0, help="The server's CPU threads (`ragkit serve --threads`)."),
    recovery: bool = typer.Option(True, "--recovery/--no-recovery", help="After the highest rate, time how long "
                                  "until a lone request's TTFT is normal again (up to 30 s of probing)."),
    questions: int = typer.Option(0, "--questions", min=0, help="Draw from this many questions only (0: all 450 "
                                  "SciFact + MuSiQue); fewer make repeats, and cache hits, likelier."),
) -> None:
    """Open-loop load (Poisson arrivals, Zipf-popular SciFact and MuSiQue questions) against a `ragkit serve`
    this bench starts on 127.0.0.1: throughput, TTFT p50/p90/p99, errors, hit rate and the knee, per mode."""
    from ragkit.bench.serve import ServeBenchSettings, format_report, run

    settings = ServeBenchSettings(rates=[float(r) for r in rates.split(",")], modes=modes.split(","),
                                  duration_s=duration, max_requests=max_requests, k=k, chunk_size=chunk_size,
                                  max_tokens=max_tokens,
                                  queue=queue, deadline_s=deadline, slo_s=slo, seed=seed, workdir=workdir,
                                  questions=questions, recovery=recovery, threads=threads)
    result = run(settings, log=log)
    emit(result, as_json, format_report)


@bench_app.command("batch")
@user_errors
def bench_batch(
    config: Path = typer.Argument(Path("configs/musique-blend.toml"), help="Generator + cache settings."),
    as_json: bool = JsonOpt,
    questions: int = typer.Option(32, "--questions", min=1, max=150, help="MuSiQue questions (bundled sample)."),
    context: int = typer.Option(1536, "--context", min=64, help="Prompt tokens per question (passages cut to fit)."),
    new_tokens: int = typer.Option(64, "--new-tokens", min=1, help="Tokens every sequence decodes in the "
                                   "decode-heavy setting (stop tokens off)."),
    batch_sizes: str = typer.Option("8,16,32", "--batch-sizes", help="Comma-separated engine batch sizes."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch CPU threads."),
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Batched decoding vs one question at a time from the same prefilled prompts: tokens/s, questions/s,
    identical greedy outputs. OpenMP threads sleep at barriers (OMP_WAIT_POLICY=PASSIVE) unless the
    environment says otherwise: spinning threads stall each other on a CPU shared with other jobs."""
    import dataclasses

    try:
        sizes = sorted({int(size) for size in batch_sizes.split(",")})
    except ValueError:
        raise typer.BadParameter(f"{batch_sizes!r}: expected comma-separated integers, e.g. 8,16,32") from None
    if sizes[0] < 1:
        raise typer.BadParameter("batch sizes must be at least 1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch starts its thread pool, below
    from ragkit.bench import batch

    cfg = load(config, overrides)
    result = batch.run(dataclasses.asdict(cfg.generator), dataclasses.asdict(cfg.cache), questions, context,
                       new_tokens, sizes, threads, log)
    emit(result, as_json, batch.format_report)


@bench_app.command("answer")
@user_errors
def bench_answer(
    as_json: bool = JsonOpt,
    questions: int = typer.Option(4, "--questions", min=1, max=100, help="MuSiQue test questions (the issue's "
                                  "setting is 50 or more; each costs a few full prefills per mode)."),
    scifact_questions: int = typer.Option(2, "--scifact-questions", min=1, help="SciFact claims with a gold "
                                          "answer."),
    modes: str = typer.Option(ANSWER_MODES, "--modes", callback=modes_option(), help="Comma-separated reuse modes; "
                              "full always runs: it is the reference."),
    warm: str = typer.Option("retrieved", "--warm", help="What is warmed before the side-by-side run: `all` "
                             "(every corpus chunk, as `ragkit cache warm`; long on a CPU) or `retrieved` (only the "
                             "chunks the benched questions retrieve: the same hits, less one-off time)."),
    log_questions: int = typer.Option(10, "--log-questions", min=0, help="MuSiQue dev questions the query-log "
                                      "warm uses (the held-out test questions are then answered; 0 skips it)."),
    batch: int = typer.Option(8, "--batch", min=1, help="The AnswerEngine's batch size for batched questions/s."),
    batch_questions: int = typer.Option(8, "--batch-questions", min=1, max=150, help="Questions of the "
                                        "decode-heavy batching setting (the issue's: 32)."),
    batch_context: int = typer.Option(512, "--batch-context", min=64, help="Prompt tokens per question there "
                                      "(the issue's: 1536)."),
    batch_new_tokens: int = typer.Option(32, "--batch-new-tokens", min=1, help="Tokens each sequence decodes "
                                         "there (the issue's: 64)."),
    musique_config: Path = typer.Option(Path("configs/musique-rag.toml"), "--musique-config", exists=True,
                                        dir_okay=False, help="The MuSiQue RAG pipeline."),
    scifact_config: Path = typer.Option(Path("configs/scifact-rag.toml"), "--scifact-config", exists=True,
                                        dir_okay=False, help="The SciFact RAG pipeline."),
    baseline_questions: int = typer.Option(0, "--baseline-questions", min=0, help="MuSiQue questions that "
                                           "transformers and llama.cpp also answer (0: all; each costs a full "
                                           "prefill or two)."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch CPU threads (and llama.cpp's)."),
    cold: bool = typer.Option(True, "--cold/--no-cold", help="Also answer on a cold cache (and warmed from a query "
                              "log): the cold row beside full, each mode's cost of a miss."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override one key of the MuSiQue "
                                                  "pipeline, e.g. --set cache.ratio=0.25 (repeatable; recorded in "
                                                  "the results; SciFact keeps its config)."),
    quiet: bool = QuietOpt,
) -> None:
    """End-to-end answering per reuse mode on MuSiQue and SciFact (EM/F1, agreement and KL against full,
    TTFT p50/p90, questions/s one at a time and batched, chunk hit rate cold / warmed / warmed from a
    query log), against transformers `generate` and llama.cpp on the same prompts."""
    if warm not in ("all", "retrieved"):
        raise typer.BadParameter(f"{warm!r}: expected `all` or `retrieved`", param_hint="--warm")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `bench batch`: read when torch starts its threads
    from ragkit.bench import answer

    # a memory store (the bench swaps in its own, in a temporary folder): nothing is left in .ragkit/kv
    pipes = [open_pipeline(musique_config, ["cache.dir=", *(overrides or [])], quiet),
             open_pipeline(scifact_config, ["cache.dir="], quiet)]
    settings = answer.AnswerBenchSettings(
        questions=questions, scifact_questions=scifact_questions, modes=modes.split(","), warm=warm,
        log_questions=log_questions, batch=batch, baseline_questions=baseline_questions, cold=cold,
        musique_overrides=list(overrides or []),
        batch_setting={"questions": batch_questions, "context_tokens": batch_context, "new_tokens": batch_new_tokens,
                       "batch_sizes": [batch]})
    result = answer.run(*pipes, settings, BenchOptions(threads=threads, log=log))
    emit(result, as_json, answer.format_report)


@bench_app.command("choices")
@user_errors
def bench_choices(
    config: Path = typer.Argument(Path("configs/scifact-rag.toml"), help="A RAG config with generator.choices."),
    as_json: bool = JsonOpt,
    questions: int = typer.Option(60, "--questions", min=1, help="Test queries with a gold answer."),
    skip: int = typer.Option(0, "--skip", min=0, help="Start after this many of them (a separate slice to tune on)."),
    modes: str = typer.Option("full,blend,naive", "--modes", help="Comma-separated reuse "
                              "modes, or blend@RATIO; full always runs: it is the reference."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads."),
    overrides: Optional[List[str]] = SetOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Closed-form answers (generator.choices) per reuse mode: choice accuracy beside free generation from the
    same prefill and the majority class, choice agreement and log-likelihood gap against full, and what scoring
    the choices costs over one prefill's TTFT."""
    import torch

    from ragkit.bench import choices
    from ragkit.bench.cache import check_variants

    check_variants(modes.split(","))
    torch.set_num_threads(threads)
    pipe = open_pipeline(config, ["cache.dir=", *(overrides or [])], quiet)
    if not pipe.config.generator.choices:
        raise typer.BadParameter("the config sets no generator.choices "
                                 "(e.g. --set 'generator.choices=[\"yes\",\"no\"]')")
    result = choices.run(pipe, questions, skip, modes.split(","), log)
    emit(result, as_json, choices.format_report)


@bench_app.command("rerank")
@user_errors
def bench_rerank(
    config: Path = typer.Argument(..., help="Pipeline TOML (its index, dataset and generator)."),
    queries: int = typer.Option(30, "--queries", min=1, help="The first N judged queries."),
    depth: int = typer.Option(20, "--depth", min=1, help="Top documents reranked per query."),
    title: bool = typer.Option(False, "--title", help="Show each document's title after the passage."),
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """LLM pointwise rerank on cached chunk KV vs uncached, one process: scores, time, nDCG@10 (+ bi-encoder)."""
    import torch

    from ragkit.bench import rerank as bench

    torch.set_num_threads(1)
    emit(bench.run(open_pipeline(config, overrides, quiet=as_json), queries, depth, title), as_json,
         bench.format_report)


@bench_app.command("scale")
@user_errors
def bench_scale(
    as_json: bool = JsonOpt,
    dense_vectors: int = typer.Option(50_000, "--dense-vectors", min=1000, help="Clustered real MiniLM embeddings "
                                      "in the dense set (the full-size figure: 10000000)."),
    bm25_chunks: int = typer.Option(50_000, "--bm25-chunks", min=1000, help="Chunks of resampled SciFact sentences "
                                    "(the full-size figure: 2000000)."),
    centres: int = typer.Option(300, "--centres", min=10, help="SciFact documents whose embeddings are the "
                                "cluster centres (embedded once, then cached; all 5183 for the full run)."),
    queries: int = typer.Option(100, "--queries", min=1, help="SciFact test queries timed and scored."),
    memory_budget: str = typer.Option("1GiB", "--memory-budget", help="Build memory budget, as index.memory_budget."),
    nlist: int = typer.Option(0, "--nlist", min=0, help="IVF lists (0: 4 * sqrt(vectors), at most 2048, "
                              "which keeps the 10M build near 10 min on one core)."),
    nprobe: int = typer.Option(32, "--nprobe", min=1, help="IVF lists probed per query."),
    rerank: int = typer.Option(20, "--rerank", min=1, help="IVF-PQ candidates re-scored exactly, as a multiple of k."),
    pq_m: int = typer.Option(96, "--pq-m", min=1, help="PQ sub-vectors per vector (8 bits each; must divide 384). "
                             "96 keeps recall@10 >= 0.9 where ~2,000 vectors share a centre, as at 10M; 48 does not."),
    ray_vectors: int = typer.Option(0, "--ray-vectors", min=0, help="Vectors rebuilt for the Ray vs one-process "
                                    "comparison (0: all of --dense-vectors; the first N of the same set)."),
    ray_chunks: int = typer.Option(0, "--ray-chunks", min=0, help="Chunks rebuilt (twice) for the Ray vs "
                                   "one-process comparison (0: all of --bm25-chunks)."),
    cache_dir: Path = typer.Option(Path(".ragkit/embeddings"), "--cache-dir", help="Embedding cache of the "
                                   "centres and queries (reuse one to skip embedding 5183 documents)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where the indexes are built (deleted after); "
                                           "needs about 1 KiB per dense vector."),
) -> None:
    """Streaming, sharded indexes at size: build docs/s, peak RSS, size, latency, QPS, recall; Ray vs one process."""
    from ragkit.bench.scale import format_report, run_scale_bench

    result = run_scale_bench(dense_vectors=dense_vectors, bm25_chunks=bm25_chunks, centres=centres, queries=queries,
                             memory_budget=memory_budget, nlist=nlist, nprobe=nprobe,
                             workdir=str(workdir) if workdir else None, cache_dir=str(cache_dir), log=log,
                             ray_vectors=ray_vectors, ray_chunks=ray_chunks, rerank=rerank, pq_m=pq_m)
    emit(result, as_json, format_report)
