"""`ragkit bench batch`: the batched answering engine against one question at a time, same prompts.

Decode-heavy setting: N MuSiQue questions of the bundled sample, each prompt holding ~CONTEXT tokens
(the question's passages in order, the last one cut), greedy, NEW new tokens and no stop tokens, so
every sequence decodes exactly NEW tokens (past the end-of-turn token the text is no answer, but it
costs what an answer's tokens cost). Each prompt is prefilled once, under the configured cache mode;
one-at-a-time decoding (`generators.generate.decode`, what `RagGenerator.answer` runs) and the engine
at each batch size start from the same prefilled KV, so their tokens must be identical and their
times differ by decoding only. Questions/s charges every run the same prefill time.
Default setting: the same prompts with the configured max_new_tokens and end-of-turn stops.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from generators.engine import AnswerEngine, Request
from generators.generate import decode
from generators.rag import RagGenerator
from ragkit.types import Chunk, token_hash

MUSIQUE = Path(__file__).resolve().parents[2] / "data" / "musique" / "musique_s.json.gz"


def musique_prompts(rag: RagGenerator, questions: int, context_tokens: int) -> list[tuple[str, list[Chunk]]]:
    """(question, chunks) whose prompts hold about `context_tokens` tokens: passages in order, the last cut."""
    prompts = []
    for q, example in enumerate(json.loads(gzip.open(MUSIQUE).read())[:questions]):
        room = context_tokens - sum(len(s.token_ids) for s in rag.prompt.segments(example["question"], []))
        chunks = []
        for p, ctx in enumerate(example["ctxs"]):
            room -= len(rag.prompt.separator_ids)
            ids = tuple(rag.prompt.chunk_ids(ctx["text"])[:max(0, room)])
            if not ids:
                break
            chunks.append(Chunk(id=f"q{q}/p{p}", doc_id=f"q{q}/p{p}", text="", token_ids=ids, span=(0, 0),
                                content_hash=token_hash(ids)))
            room -= len(ids)
        prompts.append((example["question"], chunks))
    return prompts


def _one_at_a_time(rag: RagGenerator, prefilled: list, new_tokens: int, stops: frozenset[int]):
    """Each prompt decoded alone from its prefilled KV; returns (tokens per question, seconds)."""
    outputs, seconds = [], 0.0
    for logits, cache, next_position, _stats in tqdm(prefilled, desc="one at a time", unit="q", leave=False):
        prompt_rows = cache.length
        start = time.perf_counter()
        outputs.append(decode(rag.model, cache, logits[None], torch.tensor([next_position]), new_tokens, stops,
                              rag.sampling)[0])
        seconds += time.perf_counter() - start
        cache.length = prompt_rows  # the next run decodes from the prompt again
    return outputs, seconds


def _batched(rag: RagGenerator, prompts, prefilled: list, batch: int, new_tokens: int, stops: frozenset[int]):
    """The engine over the same prefilled prompts; returns (tokens per question, seconds, engine)."""
    by_prompt = {tuple(c.id for c in chunks): result for (_question, chunks), result in zip(prompts, prefilled)}

    def memo(_question, chunks, _mode, **_options):  # the prompt's KV as prefilled once; its misses stored already
        logits, cache, next_position, stats = by_prompt[tuple(c.id for c in chunks)]
        return logits, cache, next_position, {**stats, "commit": lambda _prefill_s: None}

    engine = AnswerEngine(rag, max_batch=batch, prefill=memo)
    requests = [Request(q, c, max_new_tokens=new_tokens, stop_ids=stops) for q, c in prompts]
    start = time.perf_counter()
    answers = engine.run(requests)
    seconds = time.perf_counter() - start
    engine.close()
    return [a.tokens for a in answers], seconds, engine


def _compare(rag, prompts, prefilled, batch_sizes: list[int], new_tokens: int, stops: frozenset[int],
             prefill_s: float, log: Callable[[str], None]) -> dict:
    """One at a time, then the engine at each batch size: tokens/s, questions/s, identical tokens."""
    log(f"decoding {len(prompts)} questions one at a time ({new_tokens} new tokens at most)")
    reference, seconds = _one_at_a_time(rag, prefilled, new_tokens, stops)
    tokens = sum(map(len, reference))
    alone = {"decode_s": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
             "questions_per_s": round(len(prompts) / (prefill_s + seconds), 4)}
    batched = {}
    for batch in batch_sizes:
        log(f"decoding them with the engine, batch {batch}")
        outputs, seconds, engine = _batched(rag, prompts, prefilled, batch, new_tokens, stops)
        tokens = sum(map(len, outputs))
        differ = [i for i, (a, b) in enumerate(zip(outputs, reference)) if a != b]
        batched[str(batch)] = {
            "decode_s": round(seconds, 3), "decode_step_s": round(engine.decode_s, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2), "questions_per_s": round(len(prompts) / (prefill_s + seconds), 4),
            "tokens_per_s_vs_one_at_a_time": round(tokens / seconds / alone["tokens_per_s"], 2),
            "questions_per_s_vs_one_at_a_time": round((prefill_s + alone["decode_s"]) / (prefill_s + seconds), 2),
            "identical_outputs": not differ, "questions_differing": differ, "peak_rows": engine.peak_rows,
            "peak_kv_mib": round(engine.peak_kv_bytes / 2**20, 1)}
    return {"one_at_a_time": alone, "batched": batched}


def run(generator: dict, cache: dict, questions: int, context_tokens: int, new_tokens: int, batch_sizes: list[int],
        threads: int, log: Callable[[str], None] = lambda _m: None) -> dict:
    torch.set_num_threads(threads)
    configured_new_tokens = int(generator["max_new_tokens"])
    rag = RagGenerator({**generator, "max_new_tokens": max(new_tokens, configured_new_tokens)},
                       {**cache, "dir": ""})  # a memory-only store: the bench leaves no cache behind
    prompts = musique_prompts(rag, questions, context_tokens)
    log(f"prefilling {len(prompts)} prompts once ({rag.settings.mode})")
    prefilled, prefill_s = [], 0.0
    for question, chunks in tqdm(prompts, desc="prefill", unit="q", leave=False):
        start = time.perf_counter()
        prefilled.append(rag.prefill(question, chunks))
        prefill_s += time.perf_counter() - start
    heavy = _compare(rag, prompts, prefilled, batch_sizes, new_tokens, frozenset(), prefill_s, log)
    default = _compare(rag, prompts, prefilled, [max(batch_sizes)], configured_new_tokens, rag.prompt.stop_ids,
                       prefill_s, log)
    largest = heavy["batched"][str(max(batch_sizes))]
    return {
        "setting": {"questions": len(prompts), "prompt_tokens_mean": round(
            sum(p[1].length for p in prefilled) / len(prefilled), 1), "mode": rag.settings.mode,
            "model": generator["model"], "dtype": rag.keys.dtype, "threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "batch_sizes": batch_sizes},
        "prefill_s": round(prefill_s, 3),
        "decode_heavy": {"max_new_tokens": new_tokens, "stops": "none", **heavy},
        "default": {"max_new_tokens": configured_new_tokens, "stops": "end of turn", **default},
        "batched_speedup_vs_sequential": largest["tokens_per_s_vs_one_at_a_time"],
        "identical_outputs": all(b["identical_outputs"] for part in (heavy, default) for b in part["batched"].values()),
    }


def format_report(result: dict) -> str:
    s = result["setting"]
    lines = [f"{s['questions']} MuSiQue questions, prompts of {s['prompt_tokens_mean']:.0f} tokens on average, "
             f"prefilled once under {s['mode']} in {result['prefill_s']:.1f} s ({s['model']}, {s['dtype']}, "
             f"{s['threads']} threads)"]
    for name in ("decode_heavy", "default"):
        part = result[name]
        alone = part["one_at_a_time"]
        lines += ["", f"{name.replace('_', '-')} (max_new_tokens {part['max_new_tokens']}, stops: {part['stops']})",
                  f"{'run':<16}{'tokens':>8}{'decode s':>10}{'tok/s':>9}{'x tok/s':>9}{'q/s':>9}{'x q/s':>8}"
                  f"{'identical':>11}",
                  f"{'one at a time':<16}{alone['tokens']:>8}{alone['decode_s']:>10.1f}{alone['tokens_per_s']:>9.1f}"
                  f"{1.0:>9.2f}{alone['questions_per_s']:>9.3f}{1.0:>8.2f}{'-':>11}"]
        for batch, row in sorted(part["batched"].items(), key=lambda item: int(item[0])):
            lines.append(f"{'batch ' + batch:<16}{row['tokens']:>8}{row['decode_s']:>10.1f}{row['tokens_per_s']:>9.1f}"
                         f"{row['tokens_per_s_vs_one_at_a_time']:>9.2f}{row['questions_per_s']:>9.3f}"
                         f"{row['questions_per_s_vs_one_at_a_time']:>8.2f}"
                         f"{'yes' if row['identical_outputs'] else 'NO ' + str(row['questions_differing']):>11}")
    return "\n".join(lines)
