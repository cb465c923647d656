"""`ragkit bench choices` (and the closed-form row of `ragkit bench answer`): closed-form answers per
reuse mode, beside free generation and the majority class.

On a RAG config with generator.choices (SciFact: yes/no), the test queries with a gold answer, from
the `skip`-th on (so a held-out slice can be named), retrieved once; their chunks are warmed on a
fresh store in a temporary folder (nothing is left behind). Per query, every mode in turn (full
first, the others rotated so none always runs right after it):
  prefill   under the mode, timed: TTFT;
  score     every choice against that prefill (generators.choices: the first token from the prefill's
            logits, the rest in one batched forward), timed apart: (prefill + score) / prefill is what
            the closed form costs over one prefill;
  generate  from the same prefill, generator.max_new_tokens greedy tokens: the answer without choices,
            right when its leading yes/no/maybe word or the whole answer (normalised) is the gold one.
A mode without @RATIO scores at cache.choice_ratio when the config sets it, as answers do.
Reported per mode (or `blend@RATIO`): choice accuracy, free-generation accuracy, choice agreement with
full (over all queries, and over the decisive ones: full's best choice ahead by DECISIVE_MARGIN), the
largest log-likelihood gap to full (mean over queries), TTFT p50, scoring p50 and the cost ratio.
Accuracy counts the queries whose gold answer is one of the choices; the others are counted apart.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from eval.answers import exact_match, yes_no_accuracy
from generators.choices import choice_ids, choice_logliks, pick
from generators.generate import decode
from generators.rag import RagGenerator, synchronize
from ragkit.bench.answer import fresh_store, prompt_ids
from ragkit.bench.cache import variant_settings
from ragkit.choices import gold_choice
from ragkit.types import Chunk

Log = Callable[[str], None]
# Full prefill's best minus runner-up choice score at or above which a query counts as decisive: a flip
# there is a real change of answer, not a near-tie (fixed before any held-out run; 0.5 nats = odds 1.65).
DECISIVE_MARGIN = 0.5


def _one(rag: RagGenerator, question: str, chunks: list[Chunk], variant: str, choices: list[str],
         ids: list[tuple[int, ...]]) -> dict:
    """Prefill, score, generate (see the module docstring) under a mode (at cache.choice_ratio when set, as
    closed-form answers are) or `blend@RATIO`; the chunks computed here are stored after."""
    settings = {**({} if "@" in variant else rag.choice_settings()), **variant_settings(variant)}
    start = time.perf_counter()
    logits, cache, next_position, stats = rag.prefill(question, chunks, **settings)
    synchronize(rag.model.device)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    logliks = choice_logliks(rag.model, cache, logits, next_position, ids)
    scored = pick(choices, ids, logliks, rag.choice_norm)
    synchronize(rag.model.device)
    score_s = time.perf_counter() - start
    tokens = decode(rag.model, cache, logits[None], torch.tensor([next_position]), rag.max_new_tokens,
                    rag.prompt.stop_ids, rag.sampling)[0]
    stats["commit"](ttft)
    runner_up = max((c.score for n, c in enumerate(scored.choices) if n != scored.best), default=float("inf"))
    return {"ttft_s": ttft, "score_s": score_s, "best": scored.best, "logliks": logliks,
            "margin": scored.choices[scored.best].score - runner_up,
            "free": rag.prompt.tokenizer.decode(tokens, skip_special_tokens=True).strip()}


def compare(rag: RagGenerator, items: list[tuple[str, list[Chunk], list[str]]], modes: list[str], log: Log) -> dict:
    """Every mode on every item (question, chunks, gold answers), interleaved per item; see the docstring."""
    choices = rag.choices
    ids = choice_ids(rag.prompt.ids, choices, "config key 'generator.choices'")
    modes = ["full"] + [m for m in modes if m != "full"]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for n, (question, chunks, _golds) in enumerate(items):
        others = modes[1:]
        shift = n % max(1, len(others))
        for mode in ["full"] + others[shift:] + others[:shift]:
            runs[mode].append(_one(rag, question, chunks, mode, choices, ids))
        log(f"query {n + 1}/{len(items)} (choice, TTFT): " + "  ".join(
            f"{m} {choices[runs[m][-1]['best']]} {runs[m][-1]['ttft_s']:.2f}s" for m in modes))
    gold = [gold_choice(golds, choices) for _q, _c, golds in items]
    scored = [n for n, g in enumerate(gold) if g is not None]
    counts = Counter(choices[gold[n]] for n in scored)
    out: dict = {"choices": choices, "choice_norm": rag.choice_norm, "queries": len(items),
                 "scored_queries": len(scored), "gold_outside_choices": len(items) - len(scored),
                 "gold_counts": dict(counts),
                 "majority_class": {"answer": counts.most_common(1)[0][0] if counts else None,
                                    "accuracy": _round(counts.most_common(1)[0][1] / len(scored)) if counts else None},
                 "modes": {}}

    decisive = [n for n, f in enumerate(runs["full"]) if f["margin"] >= DECISIVE_MARGIN]
    out["decisive_queries"] = len(decisive)
    for mode in modes:
        rows, full = runs[mode], runs["full"]
        ratios = [(r["ttft_s"] + r["score_s"]) / r["ttft_s"] for r in rows]
        free = [max(yes_no_accuracy(rows[n]["free"], items[n][2][0]), exact_match(rows[n]["free"], items[n][2]))
                for n in scored]
        out["modes"][mode] = {
            "choice_accuracy": _round(statistics.mean(float(rows[n]["best"] == gold[n]) for n in scored))
            if scored else None,
            "free_accuracy": _round(statistics.mean(free)) if scored else None,
            "choice_agreement_vs_full": _round(statistics.mean(float(r["best"] == f["best"])
                                                               for r, f in zip(rows, full))),
            "choice_agreement_decisive": _round(statistics.mean(float(rows[n]["best"] == full[n]["best"])
                                                                for n in decisive)) if decisive else None,
            "loglik_gap_vs_full": _round(statistics.mean(max(abs(a - b) for a, b in zip(r["logliks"], f["logliks"]))
                                                         for r, f in zip(rows, full))),
            "ttft_p50_s": _round(statistics.median(r["ttft_s"] for r in rows)),
            "score_p50_s": _round(statistics.median(r["score_s"] for r in rows)),
            "prefill_plus_score_vs_prefill_p50": _round(statistics.median(ratios)),
            "prefill_plus_score_vs_prefill_max": _round(max(ratios)),
            "picked": dict(Counter(choices[r["best"]] for r in rows)),
            "free_answers": [r["free"] for r in rows[:5]],  # a sample, to see what free generation says
        }
    return out


def _round(value: float) -> float:
    return round(float(value), 4)


def run(pipe, questions: int, skip: int, modes: list[str], log: Log = lambda _m: None) -> dict:
    """The bench on one pipeline whose config sets generator.choices: its `questions` test queries with gold
    answers from the `skip`-th on."""
    cfg = pipe.config
    queries = [q for q in pipe.queries() if q.answers][skip: skip + questions]
    hits = pipe.retrieve_batch([q.text for q in queries], cfg.generator.chunks)
    items = [(q.text, [pipe.chunk(h.id) for h in found], list(q.answers)) for q, found in zip(queries, hits)]
    rag = pipe.generator
    with tempfile.TemporaryDirectory(prefix="ragkit-bench-choices-") as tmp:
        fresh_store(rag, Path(tmp), cfg.cache.host_bytes)
        log(f"{cfg.name}: warming the chunks {len(items)} queries retrieve")
        rag.warm([c for _q, chunks, _g in items for c in chunks], progress=pipe.progress)
        result = compare(rag, items, modes, log)
    return {"config": cfg.name, "slice": f"test queries with gold answers, positions {skip + 1}-{skip + len(items)}",
            "chunks_per_query": cfg.generator.chunks, "max_new_tokens": rag.max_new_tokens,
            "prompt_tokens_mean": round(statistics.mean(len(prompt_ids(rag, q, c)) for q, c, _g in items), 1),
            "ratio": rag.settings.ratio, "choice_ratio": rag.choice_ratio or rag.settings.ratio,
            "full_layers": rag.settings.full_layers,
            "threads": torch.get_num_threads(), **result}


def format_table(result: dict) -> list[str]:
    """The per-mode closed-form table (also `ragkit bench answer`'s closed-form row)."""
    majority = result["majority_class"]
    lines = [f"closed form: choices {result['choices']} (norm {result['choice_norm']}), {result['scored_queries']} "
             f"scored queries ({result['gold_outside_choices']} with gold outside the choices), gold "
             f"{result['gold_counts']}; majority class {majority['answer']!r} accuracy {majority['accuracy']}; "
             f"decisive (full's margin >= {DECISIVE_MARGIN} nats): {result['decisive_queries']} queries",
             f"{'mode':<11}{'choice acc':>11}{'free acc':>9}{'agree':>7}{'decisive':>9}{'LL gap':>8}{'TTFT p50':>10}"
             f"{'score p50':>11}{'(prefill+score)/prefill p50':>29}{'max':>7}  picked"]
    for mode in sorted(result["modes"], key=lambda m: m != "full"):  # full first (JSON output sorts the keys)
        r = result["modes"][mode]
        lines.append(f"{mode:<11}{_cell(r['choice_accuracy'], 11)}{_cell(r['free_accuracy'], 9)}"
                     f"{r['choice_agreement_vs_full']:>7.3f}{_cell(r['choice_agreement_decisive'], 9)}"
                     f"{r['loglik_gap_vs_full']:>8.4f}{r['ttft_p50_s']:>9.3f}s"
                     f"{r['score_p50_s'] * 1000:>9.2f}ms{r['prefill_plus_score_vs_prefill_p50']:>29.3f}"
                     f"{r['prefill_plus_score_vs_prefill_max']:>7.3f}  {r['picked']}")
    return lines


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"


def format_report(result: dict) -> str:
    head = (f"{result['config']}: {result['slice']}, {result['chunks_per_query']} chunks each, prompts of "
            f"{result['prompt_tokens_mean']:.0f} tokens; blend ratio {result['ratio']} (scoring choices: "
            f"{result.get('choice_ratio', result['ratio'])}) after {result['full_layers']} "
            f"full layers; {result['threads']} thread(s); free generation: {result['max_new_tokens']} new tokens")
    return "\n".join([head, *format_table(result)])
