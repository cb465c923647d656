"""The `ragkit` command: a thin shell over the Python API (Pipeline, ragkit.api, ragkit.bench, ragkit.serve).

Every command takes a pipeline TOML (see configs/) and `--set section.key=value` overrides.
User errors print one line on stderr and exit with code 2 (ragkit.shell).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ragkit.bench.commands import bench_app
from ragkit.shell import ConfigArg, QuietOpt, SetOpt, SkipOpt, load, modes_option, open_pipeline, print_json, \
    user_errors

app = typer.Typer(
    help="ragkit: index a corpus, retrieve, answer with reused chunk KV caches, evaluate and compare.\n\n"
    "Start with `make run`, or: ragkit index configs/scifact-bm25.toml && ragkit eval configs/scifact-bm25.toml",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="The chunk KV cache: precompute, inspect, clear.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(cache_app, name="cache")


def _report_skips(pipe) -> None:
    skipped = pipe.dataset.skipped
    if skipped.total:
        typer.echo(f"warning: {skipped.summary()}", err=True)


@app.command()
@user_errors
def index(config: Path = ConfigArg, overrides: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
          skip_bad_lines: bool = SkipOpt) -> None:
    """Read the corpus, chunk it and build every retriever's index (saved under indexes/<name>)."""
    pipe = open_pipeline(config, overrides, quiet, skip_bad_lines)
    info = pipe.index()
    _report_skips(pipe)
    typer.echo(f"indexed {info['documents']} documents as {info['chunks']} chunks -> {info['path']}")


@app.command()
@user_errors
def query(
    config: Path = ConfigArg,
    question: str = typer.Argument(..., help="The question to retrieve for (and answer, with a generator)."),
    k: int = typer.Option(10, "--k", "-k", min=1, help="How many chunks to show."),
    answer: bool = typer.Option(False, "--answer/--no-answer", help="Also generate an answer from the top chunks."),
    overrides: Optional[List[str]] = SetOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Show the top chunks for a question (through the config's [query] and [rerank]); with --answer, answer it."""
    pipe = open_pipeline(config, overrides, quiet)
    for hit in pipe.answer_hits([question], k=k)[0]:
        text = pipe.chunk_text(hit.id).replace("\n", " ")
        typer.echo(f"{hit.rank:>3}  {hit.score:8.4f}  {hit.id}  {text[:100]}")
    if answer:
        result = pipe.ask(question)
        typer.echo("")
        typer.echo(f"answer: {result.text}")
        typer.echo(f"cited: {', '.join(result.chunk_ids)}")
        typer.echo(f"ttft: {result.ttft_s:.3f}s  cache hits: {result.cache_hits}/{len(result.chunk_ids)}  "
                   f"recomputed tokens: {result.recomputed_tokens}/{result.context_tokens}  mode: {result.mode}")


@app.command("eval")
@user_errors
def evaluate(
    config: Path = ConfigArg,
    as_json: bool = typer.Option(False, "--json", help="Also print the results object as JSON on stdout."),
    answers: Optional[bool] = typer.Option(None, "--answers/--no-answers", help="Also answer every query from its "
                                           "top generator.chunks chunks and score the answers against the "
                                           "queries' gold answers (default: when the config has a generator section)."),
    reference: Optional[str] = typer.Option(None, "--reference", callback=modes_option(), help="Also answer each "
                                            "prompt under this cache mode (e.g. full) and record token agreement "
                                            "and first-token KL against it: the quality gate on a cache run."),
    overrides: Optional[List[str]] = SetOpt,
    quiet: bool = QuietOpt,
    skip_bad_lines: bool = SkipOpt,
) -> None:
    """Retrieve for every query, score against the qrels, write runs/<name>/ (run.trec, results.json, config).

    With a generator section in the config (or --answers) also answer every query with the configured cache.mode:
    EM/F1 (eval.answer_metrics), TTFT p50/p90, questions/s, chunk hit rate and recompute share go
    into results.json, each answer into answers.jsonl. Builds the index first when indexes/<name>/
    does not exist yet."""
    pipe = open_pipeline(config, overrides, quiet, skip_bad_lines)
    if reference is not None and answers is False:
        raise typer.BadParameter("--reference compares answers: drop --no-answers")
    results = pipe.evaluate(answers=answers, reference=reference)
    if "tasks" in results:  # a suite: one row per task, then their average
        for task, summary in results["skipped"].items():
            typer.echo(f"warning: {task}: {summary}", err=True)
    else:
        _report_skips(pipe)
    if as_json:
        print_json(results)
    elif "tasks" in results:
        names = list(results["average"])
        width = max(len("average"), *(len(t) for t in results["tasks"]))
        typer.echo(f"{'task':<{width}}  " + "  ".join(f"{n:>10}" for n in names))
        for task, aggregate in [*results["tasks"].items(), ("average", results["average"])]:
            typer.echo(f"{task:<{width}}  " + "  ".join(f"{aggregate[n]:>10.4f}" for n in names))
        typer.echo(f"runs written under {results['run_dir']}/")
    else:
        metrics = results["aggregate"]
        shown = [*pipe.config.eval.metrics, *(pipe.config.eval.answer_metrics if "cache_mode" in results else [])]
        typer.echo("  ".join(f"{name} {metrics[name]:.4f}" for name in shown if name in metrics))
        if "cache_mode" in results:
            from ragkit.api import answer_summary

            typer.echo(answer_summary(results))
        typer.echo(f"run written to {results['run_dir']}")


@app.command()
@user_errors
def score(
    run_file: Path = typer.Argument(..., help="TREC run file (qid Q0 docid rank score tag), e.g. runs/x/run.trec.",
                                    show_default=False),
    qrels_file: Path = typer.Argument(..., help="Qrels: BEIR TSV (.tsv, with header) or TREC (qid 0 docid grade).",
                                      show_default=False),
    metrics: Optional[List[str]] = typer.Option(None, "--metric", "-m", help="Metric (repeatable; default "
                                                "ndcg@10, map@100, recall@100, p@10, mrr)."),
    skip_unjudged: bool = typer.Option(False, "--skip-unjudged", help="Leave out (and count) run queries the "
                                       "qrels do not judge instead of stopping."),
    per_query: bool = typer.Option(False, "--per-query", help="Also print one line per query."),
    skip_bad_lines: bool = SkipOpt,
) -> None:
    """Score any TREC run file the way `ragkit eval` does: every judged query counts, the run's order is kept."""
    from ragkit.api import score_file

    scored = score_file(run_file, qrels_file, metrics, skip_unjudged, skip_bad_lines)
    names, values = scored["metrics"], scored["per_query"]
    if per_query:
        for qid in sorted(values):
            typer.echo(f"{qid}\t" + "\t".join(f"{values[qid][m]:.4f}" for m in names))
    typer.echo("  ".join(f"{name} {scored['aggregate'][name]:.4f}" for name in names))
    typer.echo(f"{len(values)} judged queries ({scored['empty']} without results, scored 0); "
               f"{len(scored['skipped'])} unjudged run queries skipped")


@app.command()
@user_errors
def report(
    runs_dir: Path = typer.Argument(..., help="Folder of run folders, e.g. runs/.", show_default=False),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Where leaderboard.md and leaderboard.html go."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Run name the ▲/▼ significance marks compare "
                                           "against (default: the first name alphabetically)."),
    metric: str = typer.Option("ndcg@10", "--metric", "-m", help="Metric in the table and the per-task plot."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip unreadable or older-format run folders "
                                      "(listed in the report) instead of stopping."),
) -> None:
    """Leaderboard of every run under RUNS_DIR: leaderboard.md and a self-contained leaderboard.html."""
    from ragkit.api import report as write_report

    info = write_report(runs_dir, out, metric=metric, baseline=baseline, skip_invalid=skip_invalid)
    for reason in info["skipped"]:
        typer.echo(f"skipped: {reason}", err=True)
    typer.echo(f"{info['runs']} runs ({info['systems']} systems × {len(info['tasks'])} tasks, baseline "
               f"'{info['baseline']}'; {len(info['skipped'])} skipped) -> {info['markdown']}, {info['html']}")


@app.command()
@user_errors
def compare(
    run_a: Path = typer.Argument(..., help="Run folder (or suite folder) A, e.g. runs/scifact-hybrid.",
                                 show_default=False),
    run_b: Path = typer.Argument(..., help="Run folder (or suite folder) B, e.g. runs/scifact-bm25.",
                                 show_default=False),
    metrics: Optional[List[str]] = typer.Option(None, "--metric", "-m", help="Metric to test (repeatable; "
                                                "default ndcg@10)."),
    samples: int = typer.Option(10_000, "--samples", min=100, help="Bootstrap resamples."),
) -> None:
    """Paired t-test and paired bootstrap over queries: is A − B different from zero?"""
    from ragkit.api import compare as compare_runs

    comparisons, unmatched = compare_runs(run_a, run_b, metrics or ["ndcg@10"], samples=samples)
    typer.echo(f"A = {run_a}   B = {run_b}")
    typer.echo(f"{'task':<24} {'metric':<12} {'queries':>7} {'A':>8} {'B':>8} {'A-B':>8} {'95% CI':>19} "
               f"{'t-test p':>9} {'bootstrap p':>11}")
    for task, c in comparisons:
        ci = f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]"
        typer.echo(f"{task:<24} {c.metric:<12} {c.queries:>7} {c.mean_a:>8.4f} {c.mean_b:>8.4f} "
                   f"{c.difference:>+8.4f} {ci:>19} {c.t_p:>9.4g} {c.bootstrap_p:>11.4g}")
        if c.only_in_a or c.only_in_b:
            typer.echo(f"  note: {c.only_in_a} queries only in A and {c.only_in_b} only in B were not paired",
                       err=True)
    if unmatched:
        typer.echo(f"tasks run by only one side (not compared): {', '.join(unmatched)}", err=True)


@app.command()
@user_errors
def serve(
    config: Path = ConfigArg,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. The default takes connections from "
                             "this machine only; binding elsewhere without --api-key prints a warning."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RAGKIT_API_KEY", help="Require "
                                          "`Authorization: Bearer KEY` on every route but /health."),
    queue: int = typer.Option(16, "--queue", min=1, help="Requests that may wait for a batch row; beyond "
                              "it: 429 with Retry-After."),
    batch: int = typer.Option(8, "--batch", min=1, help="Requests decoded together: new requests join the "
                              "running batch between decode steps, up to this many; the rest wait in the queue."),
    deadline: float = typer.Option(120.0, "--deadline", min=1.0, help="Seconds a request may take from arrival "
                                   "to its last token; past it the request is cancelled (504)."),
    max_k: int = typer.Option(20, "--max-k", min=1, help="Largest k (chunks) a request may ask for."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Largest max_tokens a request may ask for."),
    modes: Optional[str] = typer.Option(None, "--modes", callback=modes_option(), help="Reuse modes a request may "
                                        "choose, comma-separated (default: every mode of the registry)."),
    arena: str = typer.Option("full,blend", "--arena", callback=modes_option(), help="The two systems (reuse modes) "
                              "the web page's arena compares."),
    preferences: Optional[Path] = typer.Option(None, "--preferences", help="JSONL file the arena's votes are "
                                               "appended to (default: <eval.runs_dir>/arena/<name>.jsonl)."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for the model (0: torch's default, one "
                                "per core); 1 is faster where other jobs share the cores."),
    overrides: Optional[List[str]] = SetOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Serve the pipeline over HTTP: /search, /answer, OpenAI-compatible /v1/chat/completions, a web page with
    an arena at /, /health and /metrics. The model and the KV cache's memory tiers stay warm across requests."""
    from ragkit.serve import ServeOptions, build_server, check_listen, run

    check_listen(host, port)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it may use it", err=True)
    pipe = open_pipeline(config, overrides, quiet)
    options = ServeOptions(queue=queue, batch=batch, deadline_s=deadline, api_key=api_key, max_k=max_k, max_tokens=max_tokens,
                           arena=tuple(arena.split(",")), preferences=preferences,
                           **({"modes": tuple(modes.split(","))} if modes else {}))
    server = build_server(pipe, options)
    typer.echo(f"serving {pipe.config.name} on http://{host}:{port}/ (batch {batch}, queue {queue}, deadline {deadline:g} s)",
               err=True)
    run(server, host=host, port=port, log_level="warning" if quiet else "info")


@cache_app.command("warm")
@user_errors
def cache_warm(
    config: Path = ConfigArg,
    top: Optional[int] = typer.Option(None, "--top", min=1, help="Only the N chunks retrieved most often for the "
                                      "queries (default: every chunk of the corpus, or with --queries every chunk "
                                      "those queries retrieve)."),
    queries: Optional[str] = typer.Option(None, "--queries", help="The queries to pick chunks for: a query log "
                                          "(.jsonl with a text/query field, or one question per line) or a split of "
                                          "the config's dataset, e.g. dev (default: the config's own queries)."),
    overrides: Optional[List[str]] = SetOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Precompute chunk KV caches into cache.dir, so later answers reuse them.

    Each chunk is stored behind the shared head and, with cache.primer_passages 1 (the default), also behind one
    typical passage of the corpus: the entry reused for a chunk that sits behind other passages (--set
    cache.primer_passages=0 halves the warm and its bytes).

    Warm from a query log, then answer held-out queries and read the hit rate they got:
    ragkit cache warm configs/musique-rag.toml --queries dev --top 200 && ragkit eval configs/musique-rag.toml"""
    pipe = open_pipeline(config, overrides, quiet)
    texts = pipe.query_log(queries) if queries is not None else None
    warmed = pipe.warm_cache(top=top, queries=texts)
    pipe.flush()
    source = f" for {len(texts)} queries of {queries}" if texts is not None else ""
    typer.echo(f"warmed {warmed} chunks{source} -> {pipe.config.cache.dir}")


@cache_app.command("stats")
@user_errors
def cache_stats(
    config: Path = ConfigArg,
    verify: bool = typer.Option(False, "--verify", help="Also read every entry and check its checksum; "
                                "bad entries are deleted (they are recomputed on next use)."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Show what cache.dir holds: entries, size against the budget, hits, ages, most used entries, and the same per
    model (one folder holds entries of several models and dtypes side by side)."""
    from ragkit import api

    cache = load(config, overrides).cache
    info = api.cache_stats(Path(cache.dir), budget=cache.disk_bytes, verify=verify)
    if as_json:
        print_json(info)
    elif info is None:
        typer.echo(f"no KV cache at {cache.dir}")
    else:
        typer.echo("\n".join(api.cache_stats_lines(info)))


@cache_app.command("clear")
@user_errors
def cache_clear(config: Path = ConfigArg, overrides: Optional[List[str]] = SetOpt) -> None:
    """Delete every entry in cache.dir (any model's); other files in that folder are left alone."""
    from ragkit import api

    root = Path(load(config, overrides).cache.dir)
    removed = api.clear_cache(root)
    if removed is None:
        typer.echo(f"no KV cache at {root}")
    else:
        typer.echo(f"removed {removed['entries']} entries ({api.size(removed['bytes'])}) from {root}")


@app.command()
@user_errors
def models(path: Optional[str] = typer.Argument(None, help="A model folder, a .gguf file or a bundled name; "
                                                "without it, the supported families.")) -> None:
    """The supported model families, or what ragkit reads from PATH (family, layers, windows, RoPE per layer,
    dtype, fingerprint) or why it refuses it."""
    from ragkit.api import models as describe

    typer.echo("\n".join(describe(path)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
