"""Leaderboards from run folders: `leaderboard.md` and a self-contained `leaderboard.html`.

Rows are systems (a run's `name`), columns are tasks (a run's `task`) plus their average, the
way BEIR, BRIGHT and CoIR papers print their tables. Each cell is the chosen metric; the best
per column is marked, and cells that differ from the baseline system's by a paired t-test at
p < 0.05 get ▲ (better) or ▼ (worse). The HTML page needs no network: CSS, the sorting script
and the plots (inline SVG from matplotlib) are all inside the one file.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragkit.errors import InputError, RagkitError
from ragkit.storage import atomic_write_text

from eval.runs import RESULTS_FILE, read_results
from eval.significance import compare_per_query

ALPHA = 0.05
# Agreement with full prefill first: it separates cache modes even where a small model's F1 is ~0.
QUALITY_METRICS = ("agreement", "choice_agreement", "f1", "em", "rouge_l", "accuracy")
BETTER, WORSE = "▲", "▼"


@dataclass(frozen=True)
class RunEntry:
    """One run folder's results, as found under the runs directory."""

    path: Path
    results: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.results["name"])

    @property
    def task(self) -> str:
        return str(self.results.get("task") or self.path.name)

    @property
    def cache_mode(self) -> str | None:
        return self.results.get("cache_mode")


@dataclass
class Cell:
    value: float
    mark: str = ""
    t_p: float | None = None
    bootstrap_p: float | None = None
    best: bool = False


@dataclass
class Row:
    name: str
    cells: dict[str, Cell] = field(default_factory=dict)
    average: float | None = None
    best_average: bool = False


@dataclass
class Leaderboard:
    metric: str
    tasks: list[str]
    rows: list[Row]
    baseline: str | None
    entries: list[RunEntry]
    skipped: list[str]


def discover_runs(runs_dir: Path, skip_invalid: bool = False) -> tuple[list[RunEntry], list[str]]:
    """Every run folder (one holding results.json) under `runs_dir`, and the skipped ones' reasons.

    An unreadable or older-format folder raises InputError, or with `skip_invalid` is skipped
    and its reason returned, so that the caller can say how many were left out.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise InputError(runs_dir, "runs folder not found", hint="run `ragkit eval <config>` first")
    entries, skipped = [], []
    for path in sorted(runs_dir.rglob(RESULTS_FILE)):
        folder = path.parent
        if any(part.startswith(".") for part in folder.relative_to(runs_dir).parts):
            continue  # a publish in progress or a crashed writer's leftovers
        try:
            entries.append(RunEntry(folder, read_results(folder)))
        except InputError as exc:
            if not skip_invalid:
                raise
            skipped.append(str(exc))
    if not entries:
        raise InputError(runs_dir, f"no run folders ({RESULTS_FILE}) found"
                         + (f"; {len(skipped)} skipped as invalid" if skipped else ""),
                         hint="run `ragkit eval <config>` first")
    seen: dict[tuple[str, str], Path] = {}
    for entry in entries:
        key = (entry.name, entry.task)
        if key in seen:
            raise InputError(entry.path / RESULTS_FILE, f"system '{entry.name}' on task '{entry.task}' is "
                             f"also in {seen[key]}", hint="rename one run (config `name`) or move it away")
        seen[key] = entry.path
    return entries, skipped


def build_leaderboard(entries: list[RunEntry], metric: str = "ndcg@10", baseline: str | None = None,
                      skipped: list[str] | None = None) -> Leaderboard:
    """Systems × tasks table of `metric`, with averages, best marks and significance marks."""
    tasks = sorted({e.task for e in entries if metric in e.results["aggregate"]})
    if not tasks:
        known = sorted({m for e in entries for m in e.results["aggregate"]})
        raise RagkitError(f"no run reports metric '{metric}'; metrics found: {', '.join(known)}")
    names = sorted({e.name for e in entries if e.task in tasks and metric in e.results["aggregate"]})
    if baseline is not None and baseline not in names:
        raise RagkitError(f"baseline '{baseline}' is not a run reporting '{metric}'; runs: {', '.join(names)}")
    baseline = baseline or names[0]
    by_key = {(e.name, e.task): e for e in entries}

    rows = []
    for name in names:
        row = Row(name)
        for task in tasks:
            entry = by_key.get((name, task))
            if entry is None or metric not in entry.results["aggregate"]:
                continue
            cell = Cell(float(entry.results["aggregate"][metric]))
            base = by_key.get((baseline, task))
            if name != baseline and base is not None:
                try:
                    comparison = compare_per_query(entry.results["per_query"], base.results["per_query"], metric,
                                                   samples=2000)
                except RagkitError:
                    comparison = None
                if comparison is not None:
                    cell.t_p, cell.bootstrap_p = comparison.t_p, comparison.bootstrap_p
                    if comparison.t_p < ALPHA and comparison.difference != 0:
                        cell.mark = BETTER if comparison.difference > 0 else WORSE
            row.cells[task] = cell
        if len(row.cells) == len(tasks):
            row.average = sum(c.value for c in row.cells.values()) / len(tasks)
        if row.cells:
            rows.append(row)

    for task in tasks:
        values = [r.cells[task].value for r in rows if task in r.cells]
        for r in rows:
            if task in r.cells and r.cells[task].value == max(values):
                r.cells[task].best = True
    averages = [r.average for r in rows if r.average is not None]
    for r in rows:
        r.best_average = r.average is not None and r.average == max(averages)
    # Best average first; systems without every task last, then by name.
    rows.sort(key=lambda r: (r.average is None, -(r.average or 0.0), r.name))
    return Leaderboard(metric, tasks, rows, baseline, entries, list(skipped or []))


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _legend(board: Leaderboard) -> str:
    return (f"Metric: {board.metric}. Best per column in bold. {BETTER}/{WORSE}: better/worse than the baseline "
            f"'{board.baseline}' on that task (paired t-test over queries, p < {ALPHA}). "
            "Average: mean over tasks, shown only for systems that ran every task.")


def render_markdown(board: Leaderboard) -> str:
    show_average = len(board.tasks) > 1
    header = ["System", *board.tasks] + (["Average"] if show_average else [])
    lines = [f"# ragkit leaderboard: {board.metric}", "", _legend(board), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in board.rows:
        cells = [row.name + (" (baseline)" if row.name == board.baseline else "")]
        for task in board.tasks:
            cell = row.cells.get(task)
            if cell is None:
                cells.append("–")
                continue
            text = _fmt(cell.value) + cell.mark
            cells.append(f"**{text}**" if cell.best else text)
        if show_average:
            text = _fmt(row.average)
            cells.append(f"**{text}**" if row.best_average else text)
        lines.append("| " + " | ".join(cells) + " |")
    detail_header = _detail_header(board)
    lines += ["", "## Runs", "", "| " + " | ".join(detail_header) + " |", "|" + "---|" * len(detail_header)]
    for entry in sorted(board.entries, key=lambda e: (e.name, e.task)):
        lines.append("| " + " | ".join(_detail_cells(entry, board)) + " |")
    if board.skipped:
        lines += ["", f"Skipped {len(board.skipped)} invalid run folder(s):", ""]
        lines += [f"- {reason}" for reason in board.skipped]
    return "\n".join(lines) + "\n"


def _detail_metrics(board: Leaderboard) -> list[str]:
    seen: list[str] = []
    for entry in board.entries:
        for name in entry.results["aggregate"]:
            if name not in seen and "ttft" not in name:
                seen.append(name)
    return seen


def _detail_header(board: Leaderboard) -> list[str]:
    return ["System", "Task", "Protocol", "Queries", "Cache mode", *_detail_metrics(board), "TTFT (s)",
            "TTFT p50 (s)", "TTFT p90 (s)", "Questions/s", "Search (s)", "Machine", "ragkit", "Created"]


def _detail_cells(entry: RunEntry, board: Leaderboard) -> list[str]:
    aggregate, results = entry.results["aggregate"], entry.results
    machine = results.get("machine") or {}
    hardware = machine.get("gpu") or f"{machine.get('cpu', '?')} ×{machine.get('torch_threads', '?')} threads"
    counts = results.get("counts") or {}
    timings = results.get("timings") or {}
    return [entry.name, entry.task, str(results.get("protocol", "")),
            str(counts.get("scored_queries", len(results["per_query"]))), entry.cache_mode or "–",
            *[_fmt(aggregate.get(m)) for m in _detail_metrics(board)],
            _fmt(aggregate.get("ttft_s"), 3), _fmt(aggregate.get("ttft_p50_s"), 3), _fmt(aggregate.get("ttft_p90_s"), 3),
            _fmt(timings.get("questions_per_s"), 3), _fmt(timings.get("search_s"), 2), str(hardware),
            str(results.get("ragkit_version", "?")), str(results.get("created", "?"))]


# -- plots ------------------------------------------------------------------------------------
def _svg(fig) -> str:
    """A matplotlib figure as an inline <svg> element (text kept as text, ids deterministic)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "ragkit"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def plot_metric_per_task(board: Leaderboard) -> str:
    """Grouped bars: one group per task, one bar per system."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(14.0, max(6.0, 0.4 * len(board.tasks) * len(board.rows) + 3)), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(board.rows))
    for i, row in enumerate(board.rows):
        xs = [t + (i - (len(board.rows) - 1) / 2) * width for t in range(len(board.tasks))]
        ys = [row.cells[task].value if task in row.cells else 0.0 for task in board.tasks]
        ax.bar(xs, ys, width=width, label=row.name, color=f"C{i % 10}")
    ax.set_xticks(range(len(board.tasks)), board.tasks, rotation=20 if len(board.tasks) > 4 else 0, ha="right"
                  if len(board.tasks) > 4 else "center")
    ax.set_ylabel(board.metric)
    ax.set_title(f"{board.metric} per task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(fig)


def quality_points(entries: list[RunEntry]) -> list[tuple[str, str, str, float, float]]:
    """(label, cache mode, quality metric, mean TTFT, quality) per run with answers; an eval run
    answered with a reference mode (`--reference full`) adds the reference's own point."""
    points = []
    for entry in entries:
        aggregate = entry.results["aggregate"]
        quality = next((m for m in QUALITY_METRICS if m in aggregate), None)
        if "ttft_s" not in aggregate or quality is None:
            continue
        label = f"{entry.name} · {entry.task}"
        points.append((label, entry.cache_mode or "?", quality, float(aggregate["ttft_s"]), float(aggregate[quality])))
        ref = entry.results.get("reference_mode")
        ref_quality = 1.0 if quality in ("agreement", "choice_agreement") else aggregate.get(f"{ref}_{quality}")
        if ref and f"{ref}_ttft_s" in aggregate and ref_quality is not None:
            points.append((f"{label} (reference)", ref, quality, float(aggregate[f"{ref}_ttft_s"]),
                           float(ref_quality)))
    return points


def plot_quality_vs_ttft(entries: list[RunEntry]) -> str:
    """Answer quality against mean time to first token, one point per run and mode, coloured by cache mode."""
    from matplotlib.figure import Figure

    points = quality_points(entries)
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    if not points:
        ax.text(0.5, 0.5, "no run with generated answers (ttft_s and agreement/f1/em) yet", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        modes = sorted({mode for _label, mode, *_ in points})
        for i, mode in enumerate(modes):
            chosen = [p for p in points if p[1] == mode]
            ax.scatter([p[3] for p in chosen], [p[4] for p in chosen], label=mode, color=f"C{i % 10}", s=40)
            for label, _mode, _quality, x, y in chosen:
                ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        metrics = sorted({p[2] for p in points})
        ax.set_xlabel("mean TTFT (s)")
        ax.set_ylabel(" / ".join(metrics))
        ax.grid(alpha=0.3)
        ax.legend(title="cache mode", fontsize="small")
    ax.set_title("answer quality vs time to first token")
    return _svg(fig)


# -- HTML -------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #eef2f7; cursor: pointer; user-select: none; }
th.sorted-asc::after { content: " \\2191"; } th.sorted-desc::after { content: " \\2193"; }
#runs th, #runs td { text-align: left; }
td.best { font-weight: bold; background: #e6f4ea; }
.better { color: #137333; } .worse { color: #b3261e; }
figure { display: inline-block; margin: 0 2em 1em 0; vertical-align: top; }
figure svg { max-width: 100%; height: auto; }
.legend, .skipped { color: #555; font-size: 0.9em; max-width: 70em; }
"""

# Click a header to sort by it (numbers by value, empty cells last); then record how large the
# table and plots rendered, so a headless-browser test can check the page really laid them out.
_JS = """
function sortTable(th) {
  const table = th.closest('table'), body = table.tBodies[0], index = th.cellIndex;
  const ascending = !th.classList.contains('sorted-asc');
  table.querySelectorAll('th').forEach(h => h.classList.remove('sorted-asc', 'sorted-desc'));
  th.classList.add(ascending ? 'sorted-asc' : 'sorted-desc');
  const key = row => { const c = row.cells[index]; const v = c.dataset.value ?? c.textContent.trim();
                        const n = parseFloat(v); return isNaN(n) ? v : n; };
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === '' || x === '\\u2013') return 1; if (y === '' || y === '\\u2013') return -1;
    const order = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
    return ascending ? order : -order; });
  rows.forEach(r => body.appendChild(r));
}
document.querySelectorAll('table.sortable th').forEach(th => th.addEventListener('click', () => sortTable(th)));
window.addEventListener('load', () => {
  const size = el => { const r = el.getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)]; };
  document.body.dataset.rendered = JSON.stringify({
    table: size(document.getElementById('leaderboard')),
    rows: document.querySelectorAll('#leaderboard tbody tr').length,
    plots: Array.from(document.querySelectorAll('figure svg')).map(size) });
});
"""


def _html_cell(value: float | None, classes: list[str], text: str, title: str = "") -> str:
    data = "" if value is None else f' data-value="{value!r}"'
    klass = f' class="{" ".join(classes)}"' if classes else ""
    tip = f' title="{html.escape(title)}"' if title else ""
    return f"<td{klass}{data}{tip}>{text}</td>"


def render_html(board: Leaderboard) -> str:
    e = html.escape
    show_average = len(board.tasks) > 1
    head = "".join(f"<th>{e(h)}</th>" for h in ["System", *board.tasks] + (["Average"] if show_average else []))
    body = []
    for row in board.rows:
        label = e(row.name) + (" <small>(baseline)</small>" if row.name == board.baseline else "")
        cells = [f"<td>{label}</td>"]
        for task in board.tasks:
            cell = row.cells.get(task)
            if cell is None:
                cells.append("<td>–</td>")
                continue
            mark = ""
            if cell.mark:
                mark = f'<span class="{"better" if cell.mark == BETTER else "worse"}">{cell.mark}</span>'
            title = "" if cell.t_p is None else f"vs {board.baseline}: t-test p={cell.t_p:.4f}, " \
                                                f"bootstrap p={cell.bootstrap_p:.4f}"
            cells.append(_html_cell(cell.value, ["best"] if cell.best else [], _fmt(cell.value) + mark, title))
        if show_average:
            cells.append(_html_cell(row.average, ["best"] if row.best_average else [], _fmt(row.average)))
        body.append("<tr>" + "".join(cells) + "</tr>")

    detail_head = "".join(f"<th>{e(h)}</th>" for h in _detail_header(board))
    detail_rows = []
    for entry in sorted(board.entries, key=lambda x: (x.name, x.task)):
        texts = _detail_cells(entry, board)
        detail_rows.append("<tr>" + "".join(f"<td>{e(t)}</td>" for t in texts) + "</tr>")
    skipped = ""
    if board.skipped:
        items = "".join(f"<li>{e(reason)}</li>" for reason in board.skipped)
        skipped = f'<div class="skipped">Skipped {len(board.skipped)} invalid run folder(s):<ul>{items}</ul></div>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ragkit leaderboard: {e(board.metric)}</title>
<style>{_CSS}</style></head>
<body>
<h1>ragkit leaderboard: {e(board.metric)}</h1>
<p class="legend">{e(_legend(board))} Click a column header to sort.</p>
<table id="leaderboard" class="sortable"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<h2>Plots</h2>
<figure id="plot-per-task">{plot_metric_per_task(board)}</figure>
<figure id="plot-quality-ttft">{plot_quality_vs_ttft(board.entries)}</figure>
<h2>Runs</h2>
<table id="runs" class="sortable"><thead><tr>{detail_head}</tr></thead><tbody>
{chr(10).join(detail_rows)}
</tbody></table>
{skipped}
<script>{_JS}</script>
</body></html>
"""


def write_report(runs_dir: Path, out_dir: Path, metric: str = "ndcg@10", baseline: str | None = None,
                 skip_invalid: bool = False) -> dict[str, Any]:
    """Write leaderboard.md and leaderboard.html for every run under `runs_dir` into `out_dir`."""
    entries, skipped = discover_runs(runs_dir, skip_invalid=skip_invalid)
    board = build_leaderboard(entries, metric=metric, baseline=baseline, skipped=skipped)
    out_dir = Path(out_dir)
    markdown_path, html_path = out_dir / "leaderboard.md", out_dir / "leaderboard.html"
    atomic_write_text(markdown_path, render_markdown(board))
    atomic_write_text(html_path, render_html(board))
    return {"markdown": str(markdown_path), "html": str(html_path), "runs": len(entries), "skipped": skipped,
            "systems": len(board.rows), "tasks": board.tasks, "baseline": board.baseline}
