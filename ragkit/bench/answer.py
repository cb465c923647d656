"""`ragkit bench answer`: end-to-end answering per reuse mode, and the baselines a user would pick instead.

Per RAG config (MuSiQue, SciFact): the first N test questions with gold answers, retrieved once.
Three cache states, each on a fresh store in a temporary folder (the bench leaves no cache behind):
  cold      nothing cached; the configured mode answers, storing what it computes as it goes, and full
            prefill answers the same questions, interleaved per question (the cost of a miss beside full);
  log       warmed from a query log (the dataset's dev split) first, then the held-out test questions;
  corpus    the chunks warmed beforehand (`--warm all`: every corpus chunk, what `ragkit cache warm`
            does; `retrieved`: only the chunks the benched questions retrieve, the same hits for a
            fraction of the one-off time), then every mode side by side: EM/F1, teacher-forced token
            agreement and first-token KL against full prefill, TTFT p50/p90, questions/s one at a time
            and through the batched AnswerEngine; with generator.choices (SciFact: yes/no) also the
            closed-form row (ragkit.bench.choices): choice accuracy per mode beside free generation
            and the majority class, choice agreement with full, and the scoring cost over one prefill.
The batched pass of each mode runs after its one-at-a-time pass, on the same store: prefix mode then
finds the prompt prefixes that pass stored. The warm's one-off time is reported apart from the answering.
Baselines on the same prompts (the segments' token ids joined) and greedy decoding: Hugging Face
transformers `generate` (its own KV cache) on the same weights, run right after full prefill per MuSiQue
question (time to its first token, questions/s), and llama.cpp's full prefill on the bundled GGUF when
`llama_cpp` imports. Decode-heavy batching comes from `ragkit.bench.batch`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from chunk_cache.store import KVStore
from eval.answers import exact_match, token_f1
from eval.generation import first_token_kl
from generators.engine import AnswerEngine, Request
from generators.generate import decode, teacher_forced_logits
from generators.rag import RagGenerator, synchronize
from ragkit.types import Chunk

Item = tuple[str, list[Chunk], list[str]]  # question, retrieved chunks, gold answers
Log = Callable[[str], None]


@dataclass
class AnswerBenchSettings:
    questions: int = 4  # MuSiQue test questions
    scifact_questions: int = 2
    modes: list[str] = dataclasses.field(default_factory=lambda: ["full", "blend"])
    warm: str = "retrieved"  # `all` corpus chunks, or the `retrieved` ones only
    log_questions: int = 10  # dev questions of the query-log warm
    batch: int = 8  # the engine's batch for batched questions/s
    baseline_questions: int = 0  # MuSiQue questions transformers and llama.cpp answer too (0: all)
    cold: bool = True  # the cold and query-log states (off: only the warmed side-by-side)
    batch_setting: dict = dataclasses.field(default_factory=dict)  # ragkit.bench.batch's decode-heavy setting
    musique_overrides: list[str] = dataclasses.field(default_factory=list)  # --set KEY=VALUE on the MuSiQue config


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (share in (0, 1]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def fresh_store(rag: RagGenerator, folder: Path, host_bytes: int) -> None:
    """Serve `rag` from an empty store whose disk tier lives in `folder` (overflow of a large warm)."""
    rag.store = KVStore(folder, rag.fingerprint, device=str(rag.model.device), host_bytes=host_bytes,
                        disk_bytes=1 << 40, write_behind=True)


def prompt_ids(rag: RagGenerator, question: str, chunks: list[Chunk]) -> list[int]:
    """The full prompt as one token list: what a plain decoder (transformers, llama.cpp) is given."""
    return [t for segment in rag.prompt.segments(question, chunks) for t in segment.token_ids]


def _timing(answers: list, chunks: int) -> dict:
    ttfts = [a.ttft_s for a in answers]
    return {"ttft_p50_s": round(percentile(ttfts, 0.5), 4), "ttft_p90_s": round(percentile(ttfts, 0.9), 4),
            "questions_per_s": round(len(answers) / sum(a.total_s for a in answers), 4),
            "hit_rate": round(sum(a.cache_hits for a in answers) / max(1, chunks), 4)}


def answer_all(rag: RagGenerator, items: list[Item], mode: str | None = None) -> dict:
    """One question at a time under `mode` (default: the configured one): TTFT, questions/s, chunk hit rate."""
    answers = [rag.answer(question, chunks, mode=mode) for question, chunks, _golds in items]
    return {"mode": mode or rag.settings.mode, "questions": len(items),
            **_timing(answers, sum(len(chunks) for _q, chunks, _g in items))}


def cold_vs_full(rag: RagGenerator, items: list[Item]) -> dict:
    """On the store as it is (fresh: nothing cached), the configured mode and full prefill answer each question,
    in alternating order, so machine load hits both alike; the mode stores what it computes as it goes."""
    answers: dict[str, list] = {"full": [], rag.settings.mode: []}
    for n, (question, chunks, _golds) in enumerate(items):
        order = ["full", rag.settings.mode] if n % 2 == 0 else [rag.settings.mode, "full"]
        for mode in order:
            answers[mode].append(rag.answer(question, chunks, mode=mode))
    chunks = sum(len(chunks) for _q, chunks, _g in items)
    out = {"mode": rag.settings.mode, "questions": len(items), **_timing(answers[rag.settings.mode], chunks),
           "full": _timing(answers["full"], chunks)}
    out["questions_per_s_vs_full"] = round(out["questions_per_s"] / out["full"]["questions_per_s"], 3)
    return out


def batched_rate(rag: RagGenerator, items: list[Item], mode: str, batch: int) -> float:
    """Questions/s of the batched engine answering every item under `mode`."""
    engine = AnswerEngine(rag, max_batch=batch)
    start = time.perf_counter()
    try:
        engine.run([Request(question, chunks, mode=mode) for question, chunks, _golds in items])
    finally:
        engine.close()
    return round(len(items) / (time.perf_counter() - start), 4)


@torch.inference_mode()
def answer_forced(rag: RagGenerator, question: str, chunks: list[Chunk], mode: str, forced: list[int] | None):
    """One answer under `mode` and, from the same prefill (untimed, before decoding), the greedy token
    predicted after each prefix of `forced`: agreement without a second prefill. Returns (Answer, logits
    [V] of the first token, predicted tokens or None)."""
    start = time.perf_counter()
    logits, cache, next_position, stats = rag.prefill(question, chunks, mode,
                                                      extra=max(rag.max_new_tokens, len(forced or [])) + 1)
    synchronize(rag.model.device)
    ttft = time.perf_counter() - start
    predicted = None
    if forced:
        prompt_rows = cache.length
        predicted = teacher_forced_logits(rag.model, cache, logits, next_position, forced).argmax(-1).tolist()
        cache.length = prompt_rows  # rewind: decoding overwrites the forced rows
    start = time.perf_counter()
    tokens = decode(rag.model, cache, logits[None], torch.tensor([next_position]), rag.max_new_tokens,
                    rag.prompt.stop_ids, rag.sampling)[0]
    decode_s = time.perf_counter() - start
    stats["commit"](ttft)
    return rag.make_answer(tokens, chunks, stats, ttft, ttft + decode_s), logits, predicted


def compare_modes(rag: RagGenerator, items: list[Item], modes: list[str], batch: int, log: Log,
                  baseline: Callable[[str, list[Chunk]], dict] | None = None, baseline_questions: int = 0) -> dict:
    """Every mode on every item, interleaved per question: quality against gold and against full prefill
    (teacher-forced agreement on full's tokens plus stop, first-token KL), TTFT, questions/s one at a time;
    then each mode through the batched engine. `baseline` (transformers) answers each question right
    after full prefill on the first `baseline_questions` (0: all), so machine load hits both alike; its
    summary is the "transformers" entry."""
    modes = ["full"] + [m for m in modes if m != "full"]
    answers: dict[str, list] = {m: [] for m in modes}
    scores: dict[str, list[dict]] = {m: [] for m in modes}
    baseline_runs: list[dict] = []
    for n, (question, chunks, _golds) in enumerate(items):
        reference, ref_logits, _ = answer_forced(rag, question, chunks, "full", None)
        forced = rag.forced_reference(reference.tokens)
        answers["full"].append(reference)
        scores["full"].append({"agreement": 1.0, "kl": 0.0})
        if baseline is not None and (not baseline_questions or n < baseline_questions):
            baseline_runs.append(baseline(question, chunks))
        others = modes[1:]
        shift = n % max(1, len(others))  # rotate the order, so no mode always runs right after full
        for mode in others[shift:] + others[:shift]:
            answer, logits, predicted = answer_forced(rag, question, chunks, mode, forced)
            scores[mode].append({"agreement": sum(int(a == b) for a, b in zip(predicted, forced)) / len(forced),
                                 "kl": first_token_kl(ref_logits.float().cpu().numpy(), logits.float().cpu().numpy())})
            answers[mode].append(answer)
        log(f"question {n + 1}/{len(items)} (TTFT/agreement): " + "  ".join(
            f"{m} {answers[m][-1].ttft_s:.2f}s/{scores[m][-1]['agreement']:.2f}" for m in modes))
    chunk_count = sum(len(chunks) for _q, chunks, _g in items)
    out = {}
    for mode in modes:
        texts = [a.text for a in answers[mode]]
        out[mode] = {
            "em": round(statistics.mean(exact_match(t, g) for t, (_q, _c, g) in zip(texts, items)), 4),
            "f1": round(statistics.mean(token_f1(t, g) for t, (_q, _c, g) in zip(texts, items)), 4),
            "agreement_vs_full": round(statistics.mean(s["agreement"] for s in scores[mode]), 4),
            "kl_vs_full": round(statistics.mean(s["kl"] for s in scores[mode]), 5),
            **_timing(answers[mode], chunk_count), "answers": texts}
    for mode in modes:
        log(f"batched engine ({mode}, batch {batch})")
        out[mode]["questions_per_s_batched"] = batched_rate(rag, items, mode, batch)
    if baseline is not None:
        out["transformers"] = baseline_summary(baseline_runs, answers["full"])
    return out


class _FirstToken:
    """A `generate` streamer that notes when the first new token arrives (the prompt is put first)."""

    def __init__(self):
        self.puts = 0
        self.at: float | None = None

    def put(self, _value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def transformers_generate(model_dir: Path, rag: RagGenerator) -> Callable[[str, list[Chunk]], dict]:
    """transformers `generate` (greedy, its own KV cache) on the same weights, answering from the same
    prompt ids: returns a function question, chunks -> its time to the first token, total time, tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=rag.model.dtype).to(rag.model.device).eval()
    stops = sorted(rag.prompt.stop_ids)

    @torch.inference_mode()
    def answer(question: str, chunks: list[Chunk]) -> dict:
        ids = torch.tensor([prompt_ids(rag, question, chunks)], device=rag.model.device)
        first = _FirstToken()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=rag.max_new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=stops[0], streamer=first)
        total = time.perf_counter() - start
        return {"ttft_s": first.at - start, "total_s": total,
                "tokens": [t for t in out[0, ids.shape[1]:].tolist() if t not in rag.prompt.stop_ids]}

    return answer


def baseline_summary(runs: list[dict], full: list) -> dict:
    """transformers against ragkit's full prefill answers of the same questions: TTFT ratio, questions/s,
    how many greedy answers are token for token the same (over the questions both answered)."""
    full = full[:len(runs)]
    ragkit_ttfts, ttfts = [a.ttft_s for a in full], [r["ttft_s"] for r in runs]
    same = sum(int(r["tokens"] == a.tokens) for r, a in zip(runs, full))
    return {"ragkit_full_ttft_p50_s": round(percentile(ragkit_ttfts, 0.5), 4),
            "hf_ttft_p50_s": round(percentile(ttfts, 0.5), 4),
            "ragkit_full_ttft_vs_hf": round(statistics.median(ragkit_ttfts) / statistics.median(ttfts), 3),
            "hf_generate_questions_per_s": round(len(runs) / sum(r["total_s"] for r in runs), 4),
            "same_tokens_as_ragkit_full": f"{same}/{len(runs)}"}


def llama_cpp_baseline(gguf: Path, rag: RagGenerator, items: list[Item], threads: int) -> dict:
    """llama.cpp's full prefill of the same prompt ids on the bundled GGUF, when llama-cpp-python imports.
    Its prompt cache reuses a previous prompt's prefix only: across these prompts, the chat head."""
    try:
        import llama_cpp
    except ImportError as exc:
        return {"available": False, "reason": f"llama-cpp-python does not import ({exc}); it has no wheel for "
                                              "this platform: pip install -e .[llamacpp] builds it from source"}
    prompts = [prompt_ids(rag, question, chunks) for question, chunks, _golds in items]
    try:
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(map(len, prompts)) + rag.max_new_tokens + 8,
                              n_threads=threads, verbose=False)
        ttfts = []
        for ids in prompts:
            llm.reset()  # full prefill: nothing of an earlier prompt reused
            start = time.perf_counter()
            llm.eval(ids)
            ttfts.append(time.perf_counter() - start)
    except Exception as exc:  # an optional baseline: its failure is reported, not fatal to the run
        return {"available": False, "reason": f"llama.cpp failed: {type(exc).__name__}: {exc}"}
    return {"available": True, "version": llama_cpp.__version__, "full_ttft_p50_s": round(percentile(ttfts, 0.5), 4)}


def bench_dataset(pipe, settings: AnswerBenchSettings, questions: int, log_split: str | None, log: Log,
                  baseline: Callable | None = None) -> tuple[dict, RagGenerator, list[Item]]:
    """The three cache states for one pipeline (see the module docstring); returns (result, generator,
    items) for llama.cpp."""
    cfg = pipe.config
    queries = [q for q in pipe.queries() if q.answers][:questions]
    texts = [q.text for q in queries]
    items = [(q.text, chunks, list(q.answers)) for q, chunks in zip(queries, pipe.chunks_for(texts))]
    rag = pipe.generator
    host_bytes = cfg.cache.host_bytes
    result = {"config": cfg.name, "questions": len(items), "chunks_per_question": cfg.generator.chunks,
              "prompt_tokens_mean": round(statistics.mean(len(prompt_ids(rag, q, c)) for q, c, _g in items), 1),
              "max_new_tokens": rag.max_new_tokens, "mode": rag.settings.mode, "ratio": rag.settings.ratio}
    with tempfile.TemporaryDirectory(prefix="ragkit-bench-answer-") as tmp:
        if settings.cold:
            fresh_store(rag, Path(tmp) / "cold", host_bytes)
            log(f"{cfg.name}: cold cache, {len(items)} questions ({rag.settings.mode} beside full)")
            result["cold"] = cold_vs_full(rag, items)

        if not settings.cold or log_split is None or not settings.log_questions:
            result["query_log"] = {"skipped": "no query-log split for this dataset" if log_split is None
                                   else "--no-cold" if not settings.cold else "--log-questions 0"}
        else:
            fresh_store(rag, Path(tmp) / "log", host_bytes)
            texts = pipe.query_log(log_split)[:settings.log_questions]
            log(f"{cfg.name}: warming from {len(texts)} {log_split} questions")
            start = time.perf_counter()
            computed = pipe.warm_cache(queries=texts)
            result["query_log"] = {"split": log_split, "log_questions": len(texts), "warmed_chunks": computed,
                                   "warm_s": round(time.perf_counter() - start, 2), **answer_all(rag, items)}

        fresh_store(rag, Path(tmp) / "corpus", host_bytes)
        log(f"{cfg.name}: warming {'every corpus chunk' if settings.warm == 'all' else 'the retrieved chunks'}")
        start = time.perf_counter()
        computed = pipe.warm_cache() if settings.warm == "all" else rag.warm(
            [c for _q, chunks, _g in items for c in chunks], progress=pipe.progress, primers=pipe.primers())
        warm_s = time.perf_counter() - start
        result["corpus_warm"] = {"scope": settings.warm, "warmed_chunks": computed, "warm_s": round(warm_s, 2),
                                 "warm_s_per_chunk": round(warm_s / max(1, computed), 3)}
        result["modes"] = compare_modes(rag, items, settings.modes, settings.batch, log, baseline,
                                        settings.baseline_questions)
        if baseline is not None:
            result["transformers"] = result["modes"].pop("transformers")
        if rag.choices:  # the closed-form row: the same items and warmed store, choices scored per mode
            from ragkit.bench import choices

            log(f"{cfg.name}: closed form, choices {rag.choices}")
            result["closed_form"] = choices.compare(rag, items, settings.modes, log)
        rag.store.flush()  # the temporary folder goes next
    return result, rag, items


def run(musique_pipe, scifact_pipe, settings: AnswerBenchSettings, options) -> dict:
    """Both datasets, the baselines on MuSiQue's prompts, and the decode-heavy batching figure
    (`options`: ragkit.bench.BenchOptions)."""
    from generators.weights import bundled_gguf
    from ragkit.bench import batch as batch_bench

    log, threads = options.log, options.threads
    torch.set_num_threads(threads)
    hf_answer = transformers_generate(musique_pipe.generator.info.folder, musique_pipe.generator)
    musique, rag, items = bench_dataset(musique_pipe, settings, settings.questions, "dev", log, hf_answer)
    hf = musique.pop("transformers")
    baseline_items = items[:settings.baseline_questions or None]
    llama = llama_cpp_baseline(bundled_gguf("smollm2"), rag, baseline_items, threads) \
        if musique_pipe.config.generator.model == "smollm2" else {"available": False, "reason": "no GGUF of this model"}
    scifact = bench_dataset(scifact_pipe, settings, settings.scifact_questions, None, log)[0]
    log("decode-heavy batching (ragkit.bench.batch)")
    cfg = musique_pipe.config
    batching = batch_bench.run(dataclasses.asdict(cfg.generator), dataclasses.asdict(cfg.cache), threads=threads,
                               **settings.batch_setting)
    blend = musique["modes"].get("blend", {})
    full = musique["modes"]["full"]
    return {
        "setting": {"threads": threads, "modes": list(musique["modes"]), "warm": settings.warm,
                    "batch": settings.batch, "model": cfg.generator.model, "dtype": rag.keys.dtype, "seed": cfg.seed,
                    "musique_overrides": settings.musique_overrides},
        "musique": musique, "scifact": scifact, "transformers": hf, "llama_cpp": llama,
        "batching": {k: batching[k] for k in ("setting", "decode_heavy", "identical_outputs")},
        "batched_speedup_vs_sequential": batching["batched_speedup_vs_sequential"],
        "blend_speedup_vs_hf_full": round(blend["questions_per_s"] / hf["hf_generate_questions_per_s"], 3)
        if blend else None,
        "blend_f1_minus_full_f1": round(blend["f1"] - full["f1"], 4) if blend else None,
        "blend_warm_questions_per_s_vs_full": round(blend["questions_per_s"] / full["questions_per_s"], 3)
        if blend else None,
        "cold_questions_per_s_vs_full": musique["cold"]["questions_per_s_vs_full"] if "cold" in musique else None,
        "hit_rate_warm": blend.get("hit_rate"),
        "full_ttft_vs_hf": hf["ragkit_full_ttft_vs_hf"],
        "blend_ttft_speedup_vs_llama_cpp_full": round(llama["full_ttft_p50_s"] / blend["ttft_p50_s"], 3)
        if llama["available"] and blend else None,
    }


def _mode_table(modes: dict, order: list[str]) -> list[str]:
    lines = [f"{'mode':<8}{'EM':>6}{'F1':>6}{'agree':>7}{'KL1':>8}{'TTFT p50':>10}{'p90':>8}{'q/s':>8}"
             f"{'q/s batch':>10}{'hits':>6}"]
    for mode in order:  # full first, as run (JSON output sorts the keys)
        r = modes[mode]
        lines.append(f"{mode:<8}{r['em']:>6.3f}{r['f1']:>6.3f}{r['agreement_vs_full']:>7.3f}{r['kl_vs_full']:>8.4f}"
                     f"{r['ttft_p50_s']:>9.3f}s{r['ttft_p90_s']:>7.3f}s{r['questions_per_s']:>8.3f}"
                     f"{r['questions_per_s_batched']:>10.3f}{r['hit_rate']:>6.2f}")
    return lines


def format_report(result: dict) -> str:
    lines = []
    for name in ("musique", "scifact"):
        d = result[name]
        w = d["corpus_warm"]
        lines.append(f"{name}: {d['questions']} questions x {d['chunks_per_question']} chunks, prompts of "
                     f"{d['prompt_tokens_mean']:.0f} tokens, max_new_tokens {d['max_new_tokens']}, "
                     f"cache.ratio {d['ratio']}")
        if "cold" in d:
            c = d["cold"]
            lines.append(f"  cold cache ({c['mode']}): hit rate {c['hit_rate']:.2f}, TTFT p50 {c['ttft_p50_s']:.3f}s, "
                         f"{c['questions_per_s']:.3f} q/s; full beside it: TTFT p50 {c['full']['ttft_p50_s']:.3f}s, "
                         f"{c['full']['questions_per_s']:.3f} q/s; cold {c['mode']} q/s vs full "
                         f"{c['questions_per_s_vs_full']:.2f}x")
        log = d["query_log"]
        lines.append(f"  warmed from {log['log_questions']} {log['split']} questions ({log['warmed_chunks']} chunks, "
                     f"{log['warm_s']:.1f}s once): hit rate {log['hit_rate']:.2f}, TTFT p50 {log['ttft_p50_s']:.3f}s, "
                     f"{log['questions_per_s']:.3f} q/s" if "skipped" not in log else f"  query log: {log['skipped']}")
        lines.append(f"  warmed beforehand ({w['scope']}: {w['warmed_chunks']} chunks in {w['warm_s']:.1f}s once, "
                     f"{w['warm_s_per_chunk']:.2f}s per chunk):")
        lines += ["  " + line for line in _mode_table(d["modes"], result["setting"]["modes"])]
        if "closed_form" in d:
            from ragkit.bench.choices import format_table

            lines += ["  " + line for line in format_table(d["closed_form"])]
        lines.append("")
    hf, llama = result["transformers"], result["llama_cpp"]
    lines += [f"transformers generate (MuSiQue prompts): TTFT p50 {hf['hf_ttft_p50_s']:.3f}s vs ragkit full prefill "
              f"{hf['ragkit_full_ttft_p50_s']:.3f}s (ratio {hf['ragkit_full_ttft_vs_hf']:.2f}); "
              f"generate {hf['hf_generate_questions_per_s']:.3f} q/s; same tokens as ragkit full "
              f"{hf['same_tokens_as_ragkit_full']}",
              f"llama.cpp: full prefill TTFT p50 {llama['full_ttft_p50_s']:.3f}s" if llama["available"]
              else f"llama.cpp: unavailable ({llama['reason']})",
              f"batched_speedup_vs_sequential {result['batched_speedup_vs_sequential']}  blend_speedup_vs_hf_full "
              f"{result['blend_speedup_vs_hf_full']}  blend_f1_minus_full_f1 {result['blend_f1_minus_full_f1']}  "
              f"hit_rate_warm {result['hit_rate_warm']}",
              f"cold_questions_per_s_vs_full {result.get('cold_questions_per_s_vs_full')}  "
              f"blend_warm_questions_per_s_vs_full {result.get('blend_warm_questions_per_s_vs_full')}"]
    return "\n".join(lines)
