"""`ragkit compare RUN_A RUN_B`: paired tests between two run folders, task by task.

A run folder is either one run (it holds results.json) or a suite folder holding one run per
task; suites are paired by task label, and tasks only one side ran are listed, not compared.
"""

from __future__ import annotations

from pathlib import Path

from ragkit.errors import InputError, RagkitError

from eval.report import RunEntry, discover_runs
from eval.significance import Comparison, compare_per_query


def _by_task(folder: Path) -> dict[str, RunEntry]:
    entries, _ = discover_runs(folder)
    tasks: dict[str, RunEntry] = {}
    for entry in entries:
        if entry.task in tasks:
            raise InputError(entry.path, f"task '{entry.task}' appears twice under {folder} "
                             f"(also {tasks[entry.task].path})", hint="pass one run folder per system")
        tasks[entry.task] = entry
    return tasks


def compare_runs(run_a: Path, run_b: Path, metrics: list[str], samples: int = 10_000,
                 seed: int = 0) -> tuple[list[tuple[str, Comparison]], list[str]]:
    """([(task, comparison) per task and metric], [tasks only one side ran])."""
    tasks_a, tasks_b = _by_task(Path(run_a)), _by_task(Path(run_b))
    if len(tasks_a) == 1 and len(tasks_b) == 1:
        # Two single runs: compare them even when their task labels differ (e.g. renamed folders).
        pairs = [(next(iter(tasks_a)), next(iter(tasks_a.values())), next(iter(tasks_b.values())))]
        unmatched = []
    else:
        pairs = [(t, tasks_a[t], tasks_b[t]) for t in sorted(tasks_a.keys() & tasks_b.keys())]
        unmatched = sorted(tasks_a.keys() ^ tasks_b.keys())
    if not pairs:
        raise RagkitError(f"{run_a} and {run_b} share no task; tasks: {sorted(tasks_a)} vs {sorted(tasks_b)}")
    comparisons = []
    for task, entry_a, entry_b in pairs:
        for metric in metrics:
            comparisons.append((task, compare_per_query(entry_a.results["per_query"], entry_b.results["per_query"],
                                                        metric, samples=samples, seed=seed)))
    return comparisons, unmatched
