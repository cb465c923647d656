"""`ragkit bench cache --frontier`: each recompute selector swept over budgets, one run, side by side.

A point is a selector at one budget (a share of the reused rows; selectors without a budget knob are
one point each). Per point, against full prefill on the same questions: TTFT speedup (median full /
median point), recompute share, first-token KL, KL averaged over the teacher-forced answer, agreement,
decisive agreement, the first pass's share of TTFT (query-aware selectors), each with a bootstrap 95%
interval over questions (paired: a resample draws the same questions for the point and for full).
The plot is speedup against first-token KL, one line per selector.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from ragkit.errors import InputError

BOOTSTRAP_SAMPLES = 2000


def frontier_points(modes: list[str], budgets: list[float]) -> list[str]:
    """Variants to run: every budgeted selector (a layer-wise rule or one that reads `ratio`) at every budget,
    every other selector once, and each SELECTOR@R as given (one more point on that selector's line, e.g. to
    reach into another selector's range). Refuses an unknown selector, a budget outside (0, 1], or no point."""
    from chunk_cache.modes import MODES

    for budget in budgets:
        if not 0.0 < budget <= 1.0:
            raise InputError("--budgets", f"budget {budget:g} is outside (0, 1]")
    points: list[str] = []
    for mode in modes:
        selector, at, share = mode.partition("@")
        if selector not in MODES:
            raise InputError("--modes", f"unknown selector {selector!r}", hint=f"one of {', '.join(MODES)}")
        if at:
            if not (takes_ratio(selector) and _is_budget(share)):
                raise InputError("--modes", f"{mode!r}: SELECTOR@R takes a share R in (0, 1] of blend, cacheblend "
                                 "or query")
            points.append(f"{selector}@{float(share):g}")
        elif takes_ratio(mode):
            points.extend(f"{mode}@{b:g}" for b in budgets)
        elif mode != "full":
            points.append(mode)
    if not points:
        raise InputError("--frontier", "no points to run", hint="--modes needs a selector other than full, and "
                         "budgeted selectors (blend, cacheblend, query) need --budgets")
    return list(dict.fromkeys(points))


def _is_budget(text: str) -> bool:
    try:
        return 0.0 < float(text) <= 1.0
    except ValueError:
        return False


def takes_ratio(mode: str) -> bool:
    from chunk_cache.modes import MODES

    return MODES[mode].layerwise is not None or mode == "query"


def interval(values: np.ndarray) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def summarise_points(modes: dict, seed: int = 0) -> dict:
    """Per point: the figures above with bootstrap 95% intervals, from `compare_modes`' per-question records."""
    full = modes["full"]["per_question"]
    n = len(full)
    draws = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP_SAMPLES, n))
    full_ttft = np.array([r["ttft_s"] for r in full])
    out = {}
    for name, entry in modes.items():
        if name == "full":
            continue
        rows = entry["per_question"]
        ttft = np.array([r["ttft_s"] for r in rows])
        columns = {
            "kl": np.array([r["kl"] for r in rows]),
            "kl_answer": np.array([r["kl_answer"] for r in rows]),
        }
        matches = np.array([r["matches"] for r in rows], dtype=float)
        reference = np.array([r["reference_tokens"] for r in rows], dtype=float)
        decisive_matches = np.array([r["decisive_matches"] for r in rows], dtype=float)
        decisive = np.array([r["decisive"] for r in rows], dtype=float)
        probe = np.array([r["probe_s"] for r in rows])
        share = np.array([r["recompute_share"] * r["context_tokens"] for r in rows])
        context = np.array([r["context_tokens"] for r in rows], dtype=float)
        figures = {
            "speedup": (lambda d: np.median(full_ttft[d], axis=-1) / np.median(ttft[d], axis=-1)),
            "first_token_kl": (lambda d: columns["kl"][d].mean(-1)),
            "answer_kl": (lambda d: columns["kl_answer"][d].mean(-1)),
            "agreement": (lambda d: matches[d].sum(-1) / np.maximum(1, reference[d].sum(-1))),
            "decisive_agreement": (lambda d: decisive_matches[d].sum(-1) / np.maximum(1, decisive[d].sum(-1))),
            "recompute_share": (lambda d: share[d].sum(-1) / np.maximum(1, context[d].sum(-1))),
            "first_pass_share": (lambda d: probe[d].mean(-1) / ttft[d].mean(-1)),
        }
        everything = np.arange(n)
        point = {"ttft_median_s": float(np.median(ttft)), "questions": n}
        for key, figure in figures.items():
            point[key] = float(figure(everything))
            point[f"{key}_ci95"] = interval(figure(draws))
        selector, _, budget = name.partition("@")
        point["selector"], point["budget"] = selector, float(budget) if budget else None
        out[name] = point
    return out


def kl_at_speedup(points: dict, selector: str, speedup: float) -> float | None:
    """`selector`'s first-token KL at `speedup`, linearly interpolated between its two nearest points by speedup;
    None outside its measured range (a frontier is compared only where both were measured)."""
    line = sorted((p["speedup"], p["first_token_kl"]) for p in points.values() if p["selector"] == selector)
    for (s0, k0), (s1, k1) in zip(line, line[1:]):
        if s0 <= speedup <= s1:
            return k0 if s1 == s0 else k0 + (k1 - k0) * (speedup - s0) / (s1 - s0)
    return next((k for s, k in line if s == speedup), None)


def format_frontier(result: dict) -> str:
    points, settings = result["points"], result["settings"]
    lines = [f"frontier: MuSiQue, {settings['questions']} questions from question {settings['offset']} x "
             f"{settings['chunks']} passages, {settings['device']}, {settings['threads']} thread(s); "
             f"full prefill TTFT median {settings['full_ttft_median_s']:.2f}s; [bootstrap 95% interval]",
             f"{'point':<16}{'vs full':>20}{'recomp':>8}{'KL1':>24}{'KL answer':>10}{'agree':>8}"
             f"{'decisive':>22}{'1st pass':>9}"]
    for name, p in points.items():
        ci = lambda key, fmt: f"{p[key]:{fmt}} [{p[key + '_ci95'][0]:{fmt}}-{p[key + '_ci95'][1]:{fmt}}]"  # noqa: E731
        lines.append(f"{name:<16}{ci('speedup', '.2f'):>20}{p['recompute_share']:>8.3f}"
                     f"{ci('first_token_kl', '.4f'):>24}{p['answer_kl']:>10.4f}{p['agreement']:>8.3f}{ci('decisive_agreement', '.3f'):>22}"
                     f"{p['first_pass_share']:>9.3f}")
    selectors = list(dict.fromkeys(p["selector"] for p in points.values()))
    for name, p in points.items():
        for other in selectors:
            kl = kl_at_speedup(points, other, p["speedup"]) if other != p["selector"] else None
            if kl is not None:
                lines.append(f"{name} at {p['speedup']:.2f}x: KL1 {p['first_token_kl']:.4f}, {other} interpolated "
                             f"to the same speedup {kl:.4f}")
    lines += [f"wrote {path}" for path in result.get("files", [])]
    return "\n".join(lines)


def plot_frontier(points: dict, path: Path, settings: dict) -> None:
    """Speedup vs first-token KL, one line per selector (budgets in order), 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_selector: dict[str, list[dict]] = {}
    for p in points.values():
        by_selector.setdefault(p["selector"], []).append(p)
    for selector, ps in by_selector.items():
        ps.sort(key=lambda p: p["budget"] or 0.0)
        x = [p["first_token_kl"] for p in ps]
        y = [p["speedup"] for p in ps]
        xerr = np.array([[p["first_token_kl"] - p["first_token_kl_ci95"][0] for p in ps],
                         [p["first_token_kl_ci95"][1] - p["first_token_kl"] for p in ps]]).clip(0)
        yerr = np.array([[p["speedup"] - p["speedup_ci95"][0] for p in ps],
                         [p["speedup_ci95"][1] - p["speedup"] for p in ps]]).clip(0)
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=2, label=selector)
        for p in ps:
            if p["budget"] is not None:
                ax.annotate(f"{p['budget']:g}", (p["first_token_kl"], p["speedup"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
    ax.axhline(5.0, color="grey", lw=0.6, ls="--")
    ax.axvline(0.02, color="grey", lw=0.6, ls="--")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("first-token KL(full || selector), nats")
    ax.set_ylabel("TTFT speedup vs full prefill")
    ax.set_title(f"{settings['questions']} MuSiQue questions from {settings['offset']}, {settings['chunks']} passages")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def write_frontier(out_dir: Path, points: dict, settings: dict) -> list[Path]:
    """frontier.json (every figure and interval) and frontier.png into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data, image = out_dir / "frontier.json", out_dir / "frontier.png"
    data.write_text(json.dumps({"settings": settings, "points": points}, indent=1), encoding="utf-8")
    plot_frontier(points, image, settings)
    return [data, image]


def cli_frontier(cfg, musique: Path, limit: int | None, offset: int, n_chunks: int, modes: str, budgets: str,
                 out_dir: Path, progress) -> dict:
    """`ragkit bench cache --frontier`: check the points, run them side by side with full, write the plot."""
    import dataclasses

    import torch

    from generators.rag import RagGenerator
    from ragkit.bench.cache import compare_modes, load_musique, passage_chunks

    try:
        shares = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise InputError("--budgets", f"expected comma-separated shares in (0, 1], got {budgets!r}") from None
    points = frontier_points([m.strip() for m in modes.split(",") if m.strip()], shares)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "--out is a file, not a folder")
    cache = dataclasses.asdict(cfg.cache)
    rag = RagGenerator(dataclasses.asdict(cfg.generator), {**cache, "dir": "", "host_bytes": max(cache["host_bytes"],
                                                                                                 2 << 30)})
    examples = load_musique(musique, limit, offset)
    items = [(ex["question"], passage_chunks(rag, ex, n_chunks, None, f"q{offset + i}"), ex["answers"])
             for i, ex in enumerate(examples)]
    progress(f"frontier: {len(items)} MuSiQue questions (from question {offset}) x {n_chunks} passages, "
             f"{len(points)} points + full")
    modes_run = compare_modes(rag, items, points, None, progress, answer=False)  # agreement needs no own answers
    settings = {"model": cfg.generator.model, "questions": len(items), "offset": offset, "chunks": n_chunks,
                "threads": torch.get_num_threads(), "device": str(rag.model.device), "dtype": rag.keys.dtype,
                "full_layers": cfg.cache.full_layers, "bootstrap_samples": BOOTSTRAP_SAMPLES,
                "full_ttft_median_s": statistics.median(r["ttft_s"] for r in modes_run["full"]["per_question"])}
    result = {"settings": settings, "points": summarise_points(modes_run)}
    result["files"] = [str(p) for p in write_frontier(out_dir, result["points"], settings)]
    return result

