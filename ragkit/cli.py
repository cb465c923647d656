"""The `ragkit` command: a thin shell over the Python API.

Every command takes a pipeline TOML (see configs/) and `--set section.key=value` overrides.
User errors print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from ragkit.errors import EXIT_USAGE, RagkitError

app = typer.Typer(
    help="ragkit: index a corpus, retrieve, answer with reused chunk KV caches, evaluate and compare.\n\n"
    "Start with `make run`, or: ragkit index configs/scifact-bm25.toml && ragkit eval configs/scifact-bm25.toml",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: side-by-side measurements printed as a table or JSON.", no_args_is_help=True)
cache_app = typer.Typer(help="The chunk KV cache: precompute, inspect, clear.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(cache_app, name="cache")

ConfigArg = typer.Argument(..., help="Pipeline TOML file, e.g. configs/scifact-bm25.toml.", show_default=False)
SetOpt = typer.Option(None, "--set", "-s", help="Override one config key, e.g. --set retrieval.k=50 (repeatable).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
SkipOpt = typer.Option(False, "--skip-bad-lines", help="Skip malformed corpus/query/qrels lines (counted and "
                       "reported) instead of stopping at the first one.")


def user_errors(func: Callable) -> Callable:
    """Turn RagkitError, and the file system refusing a read or write (a folder that is a file, no
    permission, a full disk), into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except RagkitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            problem = "a file where a folder is needed" if isinstance(exc, (FileExistsError, NotADirectoryError)) \
                else exc.strerror or str(exc)
            typer.echo(f"error: {where}{problem} (check the paths in the config and free disk space)", err=True)
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper


def _pipeline(config: Path, overrides: Optional[List[str]], quiet: bool = False, skip_bad_lines: bool = False):
    from ragkit.config import parse_overrides
    from ragkit.pipeline import Pipeline

    if quiet:  # also silences the bars of libraries underneath (sentence-transformers, datasets)
        os.environ["TQDM_DISABLE"] = "1"
    return Pipeline.from_config(config, overrides=parse_overrides(overrides or []), progress=not quiet,
                                skip_bad_lines=skip_bad_lines)


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _emit(result: dict, as_json: bool, format_report: Callable[[dict], str]) -> None:
    """A bench result as JSON on stdout, or as its human-readable table."""
    if as_json:
        _print_json(result)
    else:
        typer.echo(format_report(result))


def _report_skips(pipe) -> None:
    skipped = pipe.dataset.skipped
    if skipped.total:
        typer.echo(f"warning: {skipped.summary()}", err=True)


@app.command()
@user_errors
def index(config: Path = ConfigArg, overrides: Optional[List[str]] = SetOpt, quiet: bool = QuietOpt,
          skip_bad_lines: bool = SkipOpt) -> None:
    """Read the corpus, chunk it and build every retriever's index (saved under indexes/<name>)."""
    pipe = _pipeline(config, overrides, quiet, skip_bad_lines)
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
    """Show the top chunks for a question; with --answer, answer it from them."""
    pipe = _pipeline(config, overrides, quiet)
    for hit in pipe.retrieve(question, k=k):
        text = pipe.chunk_text(hit.id).replace("\n", " ")
        typer.echo(f"{hit.rank:>3}  {hit.score:8.4f}  {hit.id}  {text[:100]}")
    if answer:
        result = pipe.ask(question)
        typer.echo("")
        typer.echo(f"answer: {result.text}")
        typer.echo(f"cited: {', '.join(result.chunk_ids)}")
        typer.echo(f"ttft: {result.ttft_s:.3f}s  cache hits: {result.cache_hits}/{len(result.chunk_ids)}  "
                   f"recomputed tokens: {result.recomputed_tokens}/{result.context_tokens}  mode: {result.mode}")


def _reference_mode(value: Optional[str]) -> Optional[str]:
    from chunk_cache.modes import MODES

    if value is not None and value not in MODES:
        raise typer.BadParameter(f"unknown mode {value!r}; allowed: {', '.join(MODES)}")
    return value


@app.command("eval")
@user_errors
def evaluate(
    config: Path = ConfigArg,
    as_json: bool = typer.Option(False, "--json", help="Also print the results object as JSON on stdout."),
    answers: Optional[bool] = typer.Option(None, "--answers/--no-answers", help="Also answer every query from its "
                                           "top generator.chunks chunks and score the answers against the "
                                           "queries' gold answers (default: when the config has a generator section)."),
    reference: Optional[str] = typer.Option(None, "--reference", callback=_reference_mode, help="Also answer each "
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
    pipe = _pipeline(config, overrides, quiet, skip_bad_lines)
    if reference is not None and answers is False:
        raise typer.BadParameter("--reference compares answers: drop --no-answers")
    results = pipe.evaluate(answers=answers, reference=reference)
    if "tasks" in results:  # a suite: one row per task, then their average
        for task, summary in results["skipped"].items():
            typer.echo(f"warning: {task}: {summary}", err=True)
    else:
        _report_skips(pipe)
    if as_json:
        _print_json(results)
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
            typer.echo(_answer_summary(results))
        typer.echo(f"run written to {results['run_dir']}")


def _answer_summary(results: dict) -> str:
    """Timing, cache and (with a reference) agreement lines of an answer run."""
    a, t, c = results["aggregate"], results["timings"], results["counts"]
    lines = [f"answers ({results['cache_mode']}): {c['answered_queries']} questions, "
             f"{c['queries_without_gold_answers']} without gold answers (retrieval only)  "
             + (f"TTFT p50 {a['ttft_p50_s']:.3f}s p90 {a['ttft_p90_s']:.3f}s  " if "ttft_p50_s" in a else "")
             + f"{t['questions_per_s'] or 0:.3f} questions/s  "
             f"chunk hit rate {a.get('chunk_hit_rate', 0):.2f}  recompute share {a.get('recompute_share', 0):.2f}"]
    if "gold_outside_choices" in c:
        lines[0] += f"  {c['gold_outside_choices']} with gold answers outside their choices (not scored)"
    ref = results.get("reference_mode")
    if ref:
        scores = "  ".join(f"{k.removeprefix(ref + '_')} {v:.4f}" for k, v in a.items()
                           if k.startswith(ref + "_") and not k.startswith(f"{ref}_ttft"))
        compared = "  ".join(f"{label} {a[key]:.4f}" for key, label in (
            ("agreement", "token agreement"), ("kl", "first-token KL"), ("choice_agreement", "choice agreement"),
            ("loglik_gap", "log-likelihood gap")) if key in a)
        lines.append(f"against {ref}: {compared}  "
                     f"{ref} TTFT p50 {a[ref + '_ttft_p50_s']:.3f}s ({a[ref + '_ttft_p50_s'] / a['ttft_p50_s']:.2f}x "
                     f"{results['cache_mode']})  {ref} answers: {scores}")
    return "\n".join(lines)


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
    from eval.retrieval import score_run
    from eval.trec import drop_unjudged, read_trec_run
    from ragkit.readers.qrels import read_qrels_trec, read_qrels_tsv

    names = metrics or ["ndcg@10", "map@100", "recall@100", "p@10", "mrr"]
    qrels = (read_qrels_tsv if qrels_file.suffix == ".tsv" else read_qrels_trec)(qrels_file, skip_bad_lines)
    run, skipped = drop_unjudged(run_file, read_trec_run(run_file), qrels, skip=skip_unjudged)
    aggregate, values = score_run(run, qrels, names)
    if per_query:
        for qid in sorted(values):
            typer.echo(f"{qid}\t" + "\t".join(f"{values[qid][m]:.4f}" for m in names))
    empty = sum(1 for q in values if not run.get(q))
    typer.echo("  ".join(f"{name} {aggregate[name]:.4f}" for name in names))
    typer.echo(f"{len(values)} judged queries ({empty} without results, scored 0); "
               f"{len(skipped)} unjudged run queries skipped")


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
    from eval.report import write_report

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
    from eval.compare import compare_runs

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


def _mode_list(value: Optional[str]) -> Optional[str]:
    from chunk_cache.modes import MODES

    if value is None:
        return value
    unknown = [m for m in value.split(",") if m not in MODES]
    if unknown:
        raise typer.BadParameter(f"unknown mode {unknown[0]!r}; allowed: {', '.join(MODES)}")
    return value


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
    modes: Optional[str] = typer.Option(None, "--modes", callback=_mode_list, help="Reuse modes a request may "
                                        "choose, comma-separated (default: every mode of the registry)."),
    arena: str = typer.Option("full,blend", "--arena", callback=_mode_list, help="The two systems (reuse modes) "
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
    pipe = _pipeline(config, overrides, quiet)
    options = ServeOptions(queue=queue, batch=batch, deadline_s=deadline, api_key=api_key, max_k=max_k, max_tokens=max_tokens,
                           arena=tuple(arena.split(",")), preferences=preferences,
                           **({"modes": tuple(modes.split(","))} if modes else {}))
    server = build_server(pipe, options)
    typer.echo(f"serving {pipe.config.name} on http://{host}:{port}/ (batch {batch}, queue {queue}, deadline {deadline:g} s)",
               err=True)
    run(server, host=host, port=port, log_level="warning" if quiet else "info")


def _cache_dir(config: Path, overrides: Optional[List[str]]):
    from ragkit.config import load_config, parse_overrides

    cfg = load_config(config, parse_overrides(overrides or []))
    return Path(cfg.cache.dir), cfg.cache


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{seconds:.0f}s"


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

    Warm from a query log, then answer held-out queries and read the hit rate they got:
    ragkit cache warm configs/musique-rag.toml --queries dev --top 200 && ragkit eval configs/musique-rag.toml"""
    pipe = _pipeline(config, overrides, quiet)
    texts = pipe.query_log(queries) if queries is not None else None
    warmed = pipe.warm_cache(top=top, queries=texts)
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
    from chunk_cache.store import cache_stats as read_stats

    root, cache = _cache_dir(config, overrides)
    info = read_stats(root, budget=cache.disk_bytes, verify=verify)
    if as_json:
        _print_json(info)
        return
    if info is None:
        typer.echo(f"no KV cache at {root}")
        return
    share = info["bytes"] / info["budget"] if info["budget"] else 0.0
    typer.echo(f"KV cache {info['dir']}  entries {info['entries']}  size {_size(info['bytes'])} of "
               f"{_size(info['budget'])} ({share:.1%})  hits {info['hits']}")
    for model, per in info["models"].items():
        typer.echo(f"  model {model}  dtypes {', '.join(per['dtypes'])}  entries {per['entries']}  "
                   f"size {_size(per['bytes'])}  hits {per['hits']}")
    if info["entries"]:
        typer.echo(f"newest {_age(info['newest_age_s'])} old, oldest {_age(info['oldest_age_s'])} old")
        typer.echo(f"{'entry':<16} {'hits':>6} {'size':>10} {'age':>8} {'recompute':>10}")
        for row in info["top"]:
            typer.echo(f"{row['digest'][:16]:<16} {row['hits']:>6} {_size(row['bytes']):>10} "
                       f"{_age(row['age_s']):>8} {row['cost_s']:>9.3f}s")
    if verify:
        dropped = info["verified"]["dropped"]
        reasons = ", ".join(f"{n} {kind}" for kind, n in sorted(dropped.items()))
        typer.echo(f"verified: {info['verified']['ok']} ok, {sum(dropped.values())} dropped"
                   + (f" ({reasons})" if reasons else ""))


@cache_app.command("clear")
@user_errors
def cache_clear(config: Path = ConfigArg, overrides: Optional[List[str]] = SetOpt) -> None:
    """Delete every entry in cache.dir (any model's); other files in that folder are left alone."""
    from chunk_cache.store import clear_cache

    root, _ = _cache_dir(config, overrides)
    removed = clear_cache(root)
    if removed is None:
        typer.echo(f"no KV cache at {root}")
    else:
        typer.echo(f"removed {removed['entries']} entries ({_size(removed['bytes'])}) from {root}")


def _default_bench_modes() -> str:
    from chunk_cache.modes import MODES

    return ",".join([*MODES, "blend@0.05"])


@bench_app.command("cache")
@user_errors
def bench_cache(
    config: Path = typer.Argument(Path("configs/musique-blend.toml"), help="Generator + cache settings."),
    as_json: bool = typer.Option(False, "--json", help="Print the results object as JSON on stdout."),
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
                              "reference. With --frontier: the selectors to sweep over --budgets."),
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
    import dataclasses

    import torch

    from eval.answers import exact_match, token_f1
    from ragkit.bench import cache as bench
    from ragkit.config import load_config, parse_overrides
    from ragkit.errors import InputError

    cfg = load_config(config, parse_overrides(overrides or []))
    if not musique.is_file():
        raise InputError(musique, "MuSiQue sample not found", hint="run from the ragkit checkout or pass --musique")
    torch.set_num_threads(threads)
    log = (lambda msg: typer.echo(msg, err=True))
    if frontier:
        from ragkit.bench import frontier as sweep

        result = sweep.cli_frontier(cfg, musique, limit, offset, chunks, modes or "blend,query", budgets, out, log)
        _emit(result, as_json, sweep.format_frontier)
        return
    bench.check_variants((modes or _default_bench_modes()).split(","))
    retrieval_requests = None
    if requests:
        from ragkit.pipeline import Pipeline

        pipe = Pipeline.from_config(stream_config, progress=False)
        queries = pipe.queries()[:max(10, requests // 2)]
        order = bench.request_stream(len(queries), requests)
        hits = pipe.retrieve_batch([q.text for q in queries], 5)
        retrieval_requests = [(queries[i].text, [pipe.chunk(h.id) for h in hits[i]]) for i in order]
    result = bench.run_bench(
        dataclasses.asdict(cfg.generator), dataclasses.asdict(cfg.cache), musique, limit,
        (modes or _default_bench_modes()).split(","), chunks, (5, 10, 20) if sweep_questions else (), 256,
        sweep_questions, retrieval_requests, cap_mib << 20,
        lambda pred, golds: (exact_match(pred, golds), token_f1(pred, golds)), log, offset)
    if runs_dir is not None:
        _write_mode_runs(runs_dir, cfg, result["modes"])
    _emit(result, as_json, bench.format_report)


def _write_mode_runs(runs_dir: Path, cfg, modes: dict) -> None:
    """One run folder per reuse mode, so the leaderboard can plot answer quality against TTFT."""
    import ragkit
    from eval.generation import score_generation
    from eval.runs import make_results, write_run
    from ragkit.types import Run

    config = cfg.to_dict()
    config["dataset"] = {"format": "musique", "path": "data/musique"}
    for mode, entry in modes.items():
        records = {f"q{i}": record for i, record in enumerate(entry["per_question"])}
        golds = {qid: list(record["golds"]) for qid, record in records.items()}
        aggregate, per_query = score_generation(records, golds)
        name = f"{cfg.name}-{mode.replace('@', '-r')}"
        results = make_results(name, "answers", aggregate, per_query, {**config, "name": name},
                               ragkit_version=ragkit.__version__, task="musique", seed=cfg.seed,
                               cache_mode=mode, counts={"questions": len(records)})
        write_run(runs_dir / name, Run({}, name=name), results, {**config, "name": name})


@bench_app.command("rerank")
@user_errors
def bench_rerank(
    config: Path = typer.Argument(..., help="Pipeline TOML (its index, dataset and generator)."),
    queries: int = typer.Option(30, "--queries", min=1, help="The first N judged queries."),
    depth: int = typer.Option(20, "--depth", min=1, help="Top documents reranked per query."),
    title: bool = typer.Option(False, "--title", help="Show each document's title after the passage."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key: section.key=value."),
    as_json: bool = typer.Option(False, "--json", help="Print the results object as JSON on stdout."),
) -> None:
    """LLM pointwise rerank on cached chunk KV vs uncached, one process: scores, time, nDCG@10 (+ bi-encoder)."""
    import torch

    from ragkit.bench import rerank as bench

    torch.set_num_threads(1)
    _emit(bench.run(_pipeline(config, overrides, quiet=as_json), queries, depth, title), as_json, bench.format_report)


@bench_app.command("store")
@user_errors
def bench_store(
    as_json: bool = typer.Option(False, "--json", help="Print the results object as JSON on stdout."),
    tokens: Optional[List[int]] = typer.Option(None, "--tokens", min=1, help="Entry length in tokens (repeatable; "
                                               "default 128, 512 and 2048)."),
    entries: int = typer.Option(4, "--entries", min=1, help="Entries per length."),
) -> None:
    """KV store costs per entry: put, verified disk get, sha256, plain file read, host hit (synthetic KV)."""
    import torch

    from ragkit.bench import store as bench

    torch.set_num_threads(1)
    result = bench.run(tokens=tuple(tokens or (128, 512, 2048)), entries=entries)
    _emit(result, as_json, bench.format_report)


@bench_app.command("retrieval")
@user_errors
def bench_retrieval(
    as_json: bool = typer.Option(False, "--json", help="Print the results object as JSON on stdout."),
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
                                 log=lambda msg: typer.echo(msg, err=True))
    _emit(result, as_json, format_report)


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
    as_json: bool = typer.Option(False, "--json", help="Print the results object as JSON on stdout."),
    rates: str = typer.Option("0.05,0.1,0.2,0.4", "--rates", callback=_rates, help="Request rates (per second) to "
                              "offer, comma-separated; each runs for --duration."),
    modes: str = typer.Option("full,prefix,blend", "--modes", callback=_mode_list, help="Reuse modes, one fresh "
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
    result = run(settings, log=lambda msg: typer.echo(msg, err=True))
    _emit(result, as_json, format_report)


@bench_app.command("batch")
@user_errors
def bench_batch(
    config: Path = typer.Argument(Path("configs/musique-blend.toml"), help="Generator + cache settings."),
    as_json: bool = typer.Option(False, "--json", help="Print the results object as JSON on stdout."),
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

    from ragkit.config import load_config, parse_overrides

    try:
        sizes = sorted({int(size) for size in batch_sizes.split(",")})
    except ValueError:
        raise typer.BadParameter(f"{batch_sizes!r}: expected comma-separated integers, e.g. 8,16,32") from None
    if sizes[0] < 1:
        raise typer.BadParameter("batch sizes must be at least 1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch starts its thread pool, below
    from ragkit.bench import batch

    cfg = load_config(config, parse_overrides(overrides or []))
    result = batch.run(dataclasses.asdict(cfg.generator), dataclasses.asdict(cfg.cache), questions, context,
                       new_tokens, sizes, threads, lambda msg: typer.echo(msg, err=True))
    _emit(result, as_json, batch.format_report)


ANSWER_MODES = "full,prefix,naive,blend,craft"


@bench_app.command("answer")
@user_errors
def bench_answer(
    as_json: bool = typer.Option(False, "--json", help="Print the results object as JSON on stdout."),
    questions: int = typer.Option(4, "--questions", min=1, max=100, help="MuSiQue test questions (the issue's "
                                  "setting is 50 or more; each costs a few full prefills per mode)."),
    scifact_questions: int = typer.Option(2, "--scifact-questions", min=1, help="SciFact claims with a gold "
                                          "answer."),
    modes: str = typer.Option(ANSWER_MODES, "--modes", callback=_mode_list, help="Comma-separated reuse modes; "
                              "full always runs: it is the reference."),
    warm: str = typer.Option("retrieved", "--warm", help="What is warmed before the side-by-side run: `all` "
                             "(every corpus chunk, as `ragkit cache warm`; long on a CPU) or `retrieved` (only the "
                             "chunks the benched questions retrieve: the same hits, less one-off time)."),
    log_questions: int = typer.Option(10, "--log-questions", min=1, help="MuSiQue dev questions the query-log "
                                      "warm uses (the held-out test questions are then answered)."),
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
    pipes = [_pipeline(config, ["cache.dir="], quiet) for config in (musique_config, scifact_config)]
    result = answer.run(*pipes, questions, scifact_questions, modes.split(","), warm, log_questions, batch, threads,
                        {"questions": batch_questions, "context_tokens": batch_context,
                         "new_tokens": batch_new_tokens, "batch_sizes": [batch]},
                        lambda msg: typer.echo(msg, err=True), baseline_questions)
    _emit(result, as_json, answer.format_report)


@bench_app.command("choices")
@user_errors
def bench_choices(
    config: Path = typer.Argument(Path("configs/scifact-rag.toml"), help="A RAG config with generator.choices."),
    as_json: bool = typer.Option(False, "--json", help="Print the results object as JSON on stdout."),
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
    pipe = _pipeline(config, ["cache.dir=", *(overrides or [])], quiet)
    if not pipe.config.generator.choices:
        raise typer.BadParameter("the config sets no generator.choices "
                                 "(e.g. --set 'generator.choices=[\"yes\",\"no\"]')")
    result = choices.run(pipe, questions, skip, modes.split(","), lambda msg: typer.echo(msg, err=True))
    _emit(result, as_json, choices.format_report)


@bench_app.command("scale")
@user_errors
def bench_scale(
    as_json: bool = typer.Option(False, "--json", help="Print the results object as JSON on stdout."),
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

    result = run_scale_bench(dense_vectors, bm25_chunks, centres, queries, memory_budget, nlist, nprobe,
                             str(workdir) if workdir else None, str(cache_dir), lambda msg: typer.echo(msg, err=True),
                             ray_vectors, ray_chunks, rerank, pq_m)
    _emit(result, as_json, format_report)


@app.command()
@user_errors
def models(path: Optional[str] = typer.Argument(None, help="A model folder, a .gguf file or a bundled name; "
                                                "without it, the supported families.")) -> None:
    """The supported model families, or what ragkit reads from PATH (family, layers, windows, RoPE per layer,
    dtype, fingerprint) or why it refuses it."""
    from generators.catalog import describe, families_table

    typer.echo("\n".join(describe(path) if path else families_table()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
