"""ragkit's functions beside `Pipeline`: score a run file, compare runs, the leaderboard, the KV cache folder,
the model families.

The CLI reaches the components (eval, chunk_cache, readers) only through `Pipeline` and these
functions, each a thin front of the component that does the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_METRICS = ["ndcg@10", "map@100", "recall@100", "p@10", "mrr"]


def score_file(run_file: Path, qrels_file: Path, metrics: list[str] | None = None, skip_unjudged: bool = False,
               skip_bad_lines: bool = False) -> dict[str, Any]:
    """Score a TREC run file against qrels (BEIR TSV when it ends in .tsv, else TREC) the way `ragkit eval`
    does: {metrics, aggregate, per_query, empty (judged queries without results), skipped (unjudged)}."""
    from eval.retrieval import score_run
    from eval.trec import drop_unjudged, read_trec_run
    from ragkit.readers.qrels import read_qrels_trec, read_qrels_tsv

    names = metrics or DEFAULT_METRICS
    qrels = (read_qrels_tsv if Path(qrels_file).suffix == ".tsv" else read_qrels_trec)(qrels_file, skip_bad_lines)
    run, skipped = drop_unjudged(run_file, read_trec_run(run_file), qrels, skip=skip_unjudged)
    aggregate, per_query = score_run(run, qrels, names)
    return {"metrics": names, "aggregate": aggregate, "per_query": per_query, "skipped": list(skipped),
            "empty": sum(1 for q in per_query if not run.get(q))}


def compare(run_a: Path, run_b: Path, metrics: list[str], samples: int = 10_000):
    """Paired t-test and bootstrap per task and metric: (comparisons, tasks only one side ran)."""
    from eval.compare import compare_runs

    return compare_runs(run_a, run_b, metrics, samples=samples)


def report(runs_dir: Path, out: Path, metric: str = "ndcg@10", baseline: str | None = None,
           skip_invalid: bool = False) -> dict[str, Any]:
    """leaderboard.md and leaderboard.html of every run under `runs_dir`."""
    from eval.report import write_report

    return write_report(runs_dir, out, metric=metric, baseline=baseline, skip_invalid=skip_invalid)


def cache_stats(root: Path, budget: int, verify: bool = False) -> dict[str, Any] | None:
    """What a KV cache folder holds (None when there is none); `verify` checks every entry."""
    from chunk_cache.store import cache_stats as read_stats

    return read_stats(root, budget=budget, verify=verify)


def clear_cache(root: Path) -> dict[str, Any] | None:
    """Delete a KV cache folder's entries (None when there is no cache there)."""
    from chunk_cache.store import clear_cache as clear

    return clear(root)


def models(path: str | None = None) -> list[str]:
    """The supported model families, or what ragkit reads from a model folder / GGUF / bundled name."""
    from generators.catalog import describe, families_table

    return describe(path) if path else families_table()


def answer_summary(results: dict) -> str:
    """Timing, cache and (with a reference) agreement lines of an answer run's results."""
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


def size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{seconds:.0f}s"


def cache_stats_lines(info: dict[str, Any]) -> list[str]:
    """`ragkit cache stats` as text: totals, per model, the most used entries, the verification."""
    share = info["bytes"] / info["budget"] if info["budget"] else 0.0
    lines = [f"KV cache {info['dir']}  entries {info['entries']}  size {size(info['bytes'])} of "
             f"{size(info['budget'])} ({share:.1%})  hits {info['hits']}"]
    for model, per in info["models"].items():
        lines.append(f"  model {model}  dtypes {', '.join(per['dtypes'])}  entries {per['entries']}  "
                     f"size {size(per['bytes'])}  hits {per['hits']}")
    if info["entries"]:
        lines.append(f"newest {_age(info['newest_age_s'])} old, oldest {_age(info['oldest_age_s'])} old")
        lines.append(f"{'entry':<16} {'hits':>6} {'size':>10} {'age':>8} {'recompute':>10}")
        lines += [f"{row['digest'][:16]:<16} {row['hits']:>6} {size(row['bytes']):>10} {_age(row['age_s']):>8} "
                  f"{row['cost_s']:>9.3f}s" for row in info["top"]]
    if "verified" in info:
        dropped = info["verified"]["dropped"]
        reasons = ", ".join(f"{n} {kind}" for kind, n in sorted(dropped.items()))
        lines.append(f"verified: {info['verified']['ok']} ok, {sum(dropped.values())} dropped"
                     + (f" ({reasons})" if reasons else ""))
    return lines
