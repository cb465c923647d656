"""Run folders: everything needed to read a result back, score it again or compare it.

`runs/<name>/` (a suite writes one such folder per task under `runs/<name>/<task>/`) holds

- `run.trec`     the scored ranking (after the protocol's exclusions and cut), TREC format, so
                 trec_eval or pytrec_eval can re-score it without ragkit; with [rerank] stages it is
                 the last stage's, and `run.first_stage.trec` (`run.stage<i>.trec`) the earlier ones';
- `results.json` the results object below;
- `config.json`  the resolved pipeline config (every default filled in);
- `answers.jsonl` only when answers were generated: one JSON object per answered query, in
                 query order: query_id, answer, golds, chunk_ids (cited, in prompt order), mode,
                 ttft_s, total_s, context_tokens, recomputed_tokens, recompute_share,
                 cache_hits; with a
                 reference mode also reference_mode, reference_answer, reference_ttft_s,
                 agreement (share of the reference's tokens predicted alike) and kl
                 (KL(reference || mode) of the first answer token). A closed-form answer (the best
                 of its choices) has instead choices ([{choice, loglik, score, tokens}]) and
                 choice_norm; with a reference mode reference_logliks, choice_agreement (1.0: the
                 same choice) and loglik_gap (largest |log-likelihood difference| of a choice).

results.json, format_version 1 (keys marked * are required to read a folder back):

    format_version*      1
    name*                system name = the config's `name` (a leaderboard row)
    task                 dataset label (a leaderboard column), e.g. "scifact", "bright/biology";
                         when absent, derived from the config's dataset section
    protocol*            "beir" | "bright" | "coir"
    aggregate*           {metric: mean over scored queries}; retrieval metrics ("ndcg@10", ...),
                         answer metrics ("em", "f1", "accuracy", "rouge_l", averaged over the
                         queries with gold answers) and the generator's cache metrics ("ttft_s",
                         "ttft_p50_s", "ttft_p90_s", "recompute_share", "chunk_hit_rate", "kl",
                         "agreement", "choice_agreement", "loglik_gap") share it; a reference mode's own figures are prefixed
                         with its name ("full_f1", "full_ttft_p50_s", ...)
    per_query*           {query id: {metric: value}}: every judged query, 0 where nothing was found
    timings              {name: seconds or rate}, e.g. search_s, answer_s, questions_per_s
    counts               {name: int}, e.g. queries, scored_queries, answered_queries,
                         queries_without_gold_answers, gold_outside_choices (closed form: not scored)
    ragkit_version, config_hash, corpus_fingerprint, seed, created (ISO 8601)
    machine              machine_info(): where the timings were measured
    cache_mode           generator cache mode when answers were generated (for quality/TTFT plots)
    stages               with [query] expansion or [rerank] stages: the stage labels in order
                         ("retrieval", "llm-pointwise@20", ...); aggregate/per_query then also hold
                         the earlier stages' metrics as "first_stage_<metric>", "stage<i>_<metric>",
                         and counts the LLM prompts computed (llm_calls) and found cached (llm_cache_hits)

Use `make_results` to build it; `read_run` refuses folders of another format version.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from ragkit.errors import InputError
from ragkit.storage import atomic_write_json, atomic_write_text, publish_dir
from ragkit.types import Run

from eval.trec import read_trec_run, write_trec_run

FORMAT_VERSION = 1
RUN_FILE = "run.trec"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
ANSWERS_FILE = "answers.jsonl"
REQUIRED_KEYS = ("format_version", "name", "protocol", "aggregate", "per_query")


def config_hash(config: dict[str, Any]) -> str:
    """Hash of the whole resolved config: two runs with the same hash ran the same settings."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def task_label(config: dict[str, Any]) -> str:
    """Leaderboard column for a run: BRIGHT domain, CoIR task, or the dataset folder's name."""
    dataset = config.get("dataset", {}) if isinstance(config, dict) else {}
    fmt = dataset.get("format", "")
    if fmt == "bright" and dataset.get("domain"):
        return f"bright/{dataset['domain']}" + ("-long" if dataset.get("long_documents") else "")
    if fmt == "coir" and dataset.get("task"):
        return f"coir/{dataset['task']}"
    path = str(dataset.get("path", "")).rstrip("/")
    return Path(path).name or "dataset"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch threads and GPU, so that timings can be compared fairly."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_results(name: str, protocol: str, aggregate: dict[str, float], per_query: dict[str, dict[str, float]],
                 config: dict[str, Any], *, ragkit_version: str, corpus_fingerprint: str = "",
                 timings: dict[str, Any] | None = None, counts: dict[str, int] | None = None,
                 task: str | None = None, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """The results object of one run (schema in the module docstring)."""
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "task": task or task_label(config),
        "protocol": protocol,
        "aggregate": dict(aggregate),
        "per_query": {q: dict(v) for q, v in per_query.items()},
        "timings": dict(timings or {}),
        "counts": dict(counts or {}),
        "ragkit_version": ragkit_version,
        "config_hash": config_hash(config),
        "corpus_fingerprint": corpus_fingerprint,
        "seed": seed,
        "machine": machine_info(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def suite_summary(name: str, task_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-task aggregates and their unweighted mean, as the BEIR/BRIGHT/CoIR tables average tasks.

    The average covers only metrics every task reports, so that it never mixes task sets.
    """
    tasks = {str(r.get("task") or r["name"]): dict(r["aggregate"]) for r in task_results}
    first = next(iter(tasks.values()), {})
    shared = [m for m in first if all(m in a for a in tasks.values())]
    average = {m: sum(a[m] for a in tasks.values()) / len(tasks) for m in shared}
    return {"name": name, "tasks": tasks, "average": average}


def write_run(run_dir: Path, run: Run, results: dict[str, Any], config: dict[str, Any],
              answers: list[dict[str, Any]] | None = None, stage_runs: dict[str, Run] | None = None) -> None:
    """Write run.trec, results.json, config.json, (given answers) answers.jsonl and (given the runs of
    earlier stages) run.<stage>.trec, replacing `run_dir` as one step."""
    missing = [key for key in REQUIRED_KEYS if key not in results]
    if missing:
        raise ValueError(f"results lack {missing}; build them with eval.runs.make_results")
    results = dict(results)
    results.setdefault("task", task_label(config))
    with publish_dir(run_dir) as tmp:
        write_trec_run(tmp / RUN_FILE, run)
        for label, stage_run in (stage_runs or {}).items():
            write_trec_run(tmp / f"run.{label}.trec", stage_run)
        atomic_write_json(tmp / RESULTS_FILE, results)
        atomic_write_json(tmp / CONFIG_FILE, config)
        if answers is not None:
            atomic_write_text(tmp / ANSWERS_FILE, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))


def read_results(run_dir: Path) -> dict[str, Any]:
    """results.json of a run folder, checked for format and required keys."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_FILE
    if not run_dir.is_dir():
        raise InputError(run_dir, "run folder not found", hint="pass a folder written by `ragkit eval`")
    if not path.is_file():
        raise InputError(path, "missing: this folder is not a ragkit run", hint="re-run `ragkit eval <config>`")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})", hint="re-run `ragkit eval <config>`") from None
    if not isinstance(results, dict):
        raise InputError(path, "expected a JSON object")
    version = results.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(path, f"results format {version!r} (written by ragkit {results.get('ragkit_version', '?')}); "
                         f"this ragkit reads format {FORMAT_VERSION}", hint="re-run `ragkit eval <config>` to rewrite it")
    missing = [key for key in REQUIRED_KEYS if key not in results]
    if missing:
        raise InputError(path, f"missing keys {missing}", hint="re-run `ragkit eval <config>`")
    if not isinstance(results["per_query"], dict) or not isinstance(results["aggregate"], dict):
        raise InputError(path, "'aggregate' and 'per_query' must be JSON objects")
    return results


def read_run(run_dir: Path) -> tuple[Run, dict[str, Any], dict[str, Any]]:
    """(run, results, config) from a run folder; InputError names the missing or outdated file."""
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(config_path, "missing from the run folder", hint="re-run `ragkit eval <config>`")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(config_path, f"not valid JSON ({exc})") from None
    run = read_trec_run(run_dir / RUN_FILE)
    run.name = results["name"]
    results.setdefault("task", task_label(config))
    return run, results, config
