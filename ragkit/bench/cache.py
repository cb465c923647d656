"""`ragkit bench cache`: every reuse mode measured side by side in one run.

Workload (a): MuSiQue questions with their passages as chunks, cache warm. For each mode, time to
first token (TTFT), context rows recomputed, first-token KL(full || mode), teacher-forced agreement
with full's greedy answer, and the mode's own answer scored against the gold answers. Modes are
interleaved per question after a warm-up, so machine load hits them alike. Chunks are warmed behind the
prompt head alone, with no primed entries (chunk_cache.primer): each question brings its own passages, not a
corpus to choose a primer from, so the selectors compare on the entries every earlier run used; `ragkit bench
answer` measures primed entries on a corpus.
Workload (b): retrieved chunks that recur across a request stream, a capped cache, LRU vs value
eviction; hit rate, bytes and end-to-end throughput against full and prefix.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from chunk_cache.reuse import ChunkReuse
from chunk_cache.store import KVStore
from eval.generation import first_token_kl
from generators.generate import teacher_forced_logits
from generators.rag import synchronize
from ragkit.errors import InputError
from ragkit.readers.musique import read_musique
from ragkit.types import Chunk, token_hash

Scorer = Callable[[str, list[str]], tuple[float, float]]  # (prediction, golds) -> (EM, F1)


def load_musique(path: Path, limit: int | None, offset: int = 0) -> list[dict]:
    """The sample's questions after the first `offset` (held out from tuning), at most `limit` of them."""
    examples = read_musique(path)[offset:]
    return examples[:limit] if limit else examples


def passage_chunks(rag, example: dict, n_chunks: int, max_tokens: int | None, qid: str) -> list[Chunk]:
    """The example's passages as chunks: whole (max_tokens None) or cut into max_tokens pieces, first n."""
    chunks = []
    for p, ctx in enumerate(example["ctxs"]):
        ids = rag.prompt.chunk_ids(ctx["text"])
        step = max_tokens or len(ids)
        for start in range(0, len(ids), step):
            piece = ids[start: start + step]
            chunks.append(Chunk(id=f"{qid}/p{p}#{start // step}", doc_id=f"{qid}/p{p}", text="", token_ids=piece,
                                span=(0, 0), content_hash=token_hash(piece), title=ctx.get("title", "")))
    return chunks[:n_chunks]


def variant_settings(variant: str) -> dict:
    """'blend' -> {'mode': 'blend'}; 'blend@0.05' -> blend at ratio 0.05 (a tuning point); 'query@256t' -> query
    with a budget of 256 recomputed rows."""
    mode, _, budget = variant.partition("@")
    if budget.endswith("t"):
        return {"mode": mode, "recompute_tokens": int(budget[:-1])}
    return {"mode": mode, **({"ratio": float(budget)} if budget else {})}


def check_variants(variants: list[str]) -> None:
    """Refuse an unknown mode or a budget a mode does not take: MODE, MODE@R (R in [0, 1], a layer-wise mode or
    query), query@Nt (N recomputed rows)."""
    from chunk_cache.modes import MODES

    for variant in variants:
        mode, at, budget = variant.partition("@")
        if mode not in MODES:
            raise InputError("--modes", f"unknown mode {mode!r}", hint=f"one of {', '.join(MODES)}")
        if not at:
            continue
        budgeted = MODES[mode].layerwise is not None or mode == "query"
        rows = mode == "query" and budget.endswith("t") and budget[:-1].isdigit()
        if not (budgeted and (rows or _is_share(budget))):
            raise InputError("--modes", f"{variant!r}: @R (a share in [0, 1]) is for blend, cacheblend and query; "
                             "@Nt (rows) for query")


def _is_share(text: str) -> bool:
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


# Full prefill's top-1 minus top-2 logit at or above which a reference token counts as decisive: a
# flip there is a real change of answer, not a near-tie (the 135M model's invented names are near-ties).
DECISIVE_MARGIN = 1.0


@torch.inference_mode()
def measure(rag, question: str, chunks: list[Chunk], variant: str, reference: list[int] | None,
            answer: bool = True):
    """One timed prefill under `variant`, then (untimed) teacher forcing on `reference` and greedy decoding
    (skipped for a variant with a reference when `answer` is False: only the reference is scored).
    Without a reference (full prefill) the greedy answer plus stop token is forced instead, for the
    top-2 margins that tell decisive reference tokens from near-ties."""
    from generators.generate import decode

    start = time.perf_counter()
    logits, cache, next_position, stats = rag.prefill(question, chunks, **variant_settings(variant))
    synchronize(rag.model.device)
    ttft = time.perf_counter() - start
    prompt_len = cache.length
    result = {"ttft_s": ttft, "logits": logits, "matches": 0, "predicted": [],
              "recomputed": stats["recomputed_tokens"], "context": stats["context_tokens"],
              "layer_share": stats["recompute_share"], "probe_s": stats.get("probe_s", 0.0)}
    if reference:
        forced = teacher_forced_logits(rag.model, cache, logits, next_position, reference)
        result["predicted"] = forced.argmax(-1).tolist()
        result["forced_logprobs"] = forced.float().log_softmax(-1).cpu()
        result["matches"] = sum(int(a == b) for a, b in zip(result["predicted"], reference))
        cache.length = prompt_len  # rewind: decoding overwrites the forced rows
        if not answer:
            return {**result, "tokens": [], "text": ""}
    tokens = decode(rag.model, cache, logits[None], torch.tensor([next_position]), rag.max_new_tokens,
                    rag.prompt.stop_ids)[0]
    if reference is None:
        cache.length = prompt_len
        forced = rag.forced_reference(tokens)
        forced_logits = teacher_forced_logits(rag.model, cache, logits, next_position, forced)
        top2 = forced_logits.topk(2, dim=-1).values
        result["margins"] = (top2[:, 0] - top2[:, 1]).tolist()
        result["forced_logprobs"] = forced_logits.float().log_softmax(-1).cpu()
    result["tokens"] = tokens
    result["text"] = rag.prompt.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return result


def hold(rag, chunks: list[Chunk]) -> None:
    """Make every chunk of the question cached and most recent, so that the entries stored while it
    is answered evict other questions' chunks, not one of its own that an earlier question cached."""
    for chunk in chunks:
        rag.store.get(rag.keys.shared(chunk.token_ids))  # a hit refreshes the entry's recency
    rag.warm(chunks, progress=False)


def compare_modes(rag, items: list[tuple[str, list[Chunk], list[str]]], modes: list[str], scorer: Scorer | None,
                  progress: Callable[[str], None] = lambda _m: None, answer: bool = True) -> dict:
    """Per mode: TTFT median/p90, speedups, recompute share, first-token KL, agreement, EM/F1 (`answer`: each
    mode also decodes its own answer)."""
    modes = ["full"] + [m for m in modes if m != "full"]
    warmup = items[0][1][:2]  # a short prompt warms allocator and kernels for every variant
    rag.warm(warmup, progress=False)
    for mode in modes:
        measure(rag, items[0][0], warmup, mode, None)
    rows = {m: [] for m in modes}
    for n, (question, chunks, golds) in enumerate(items):
        hold(rag, chunks)
        full = measure(rag, question, chunks, "full", None)
        reference = rag.forced_reference(full["tokens"])
        full["matches"] = len(reference)
        full["reference"] = len(reference)
        full["predicted"] = reference
        decisive = [m >= DECISIVE_MARGIN for m in full["margins"]]
        rows["full"].append(full)
        shift = n % max(1, len(modes) - 1)  # interleave the order, so no mode always runs first
        rotated = modes[1:][shift:] + modes[1:][:shift]
        for mode in rotated:
            result = measure(rag, question, chunks, mode, reference, answer)
            result["kl"] = first_token_kl(full["logits"].cpu().numpy(), result["logits"].cpu().numpy())
            result["kl_answer"] = answer_kl(full["forced_logprobs"], result.pop("forced_logprobs"))
            result["reference"] = len(reference)
            rows[mode].append(result)
        for mode in modes:
            r = rows[mode][-1]
            r["decisive"] = sum(decisive)
            r["decisive_matches"] = sum(int(d and a == b) for d, a, b in zip(decisive, r["predicted"], reference))
        for mode in modes:
            rows[mode][-1]["golds"] = golds
        full.pop("forced_logprobs")
        progress(f"question {n + 1}/{len(items)} (TTFT/agreement/KL1): " + "  ".join(
            f"{m} {r['ttft_s']:.2f}s/{r['matches'] / max(1, r['reference']):.3f}/{r.get('kl', 0.0):.3f}"
            for m, r in ((m, rows[m][-1]) for m in modes)))
    return summarise(rows, scorer)


def answer_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(full || mode) averaged over the teacher-forced answer's steps, from log-probabilities [R, V]."""
    return max(0.0, float((reference.exp() * (reference - other)).sum(-1).mean()))


def summarise(rows: dict[str, list[dict]], scorer: Scorer | None) -> dict:
    medians = {m: statistics.median(r["ttft_s"] for r in rs) for m, rs in rows.items()}
    out = {}
    for mode, results in rows.items():
        ttfts = sorted(r["ttft_s"] for r in results)
        entry = {
            "ttft_median_s": medians[mode],
            "ttft_p90_s": ttfts[min(len(ttfts) - 1, math.ceil(0.9 * len(ttfts)) - 1)],
            "speedup_vs_full": medians["full"] / medians[mode],
            "speedup_vs_prefix": medians["prefix"] / medians[mode] if "prefix" in medians else None,
            # chunk rows computed summed over every layer (the fully recomputed leading layers included)
            "recompute_share": sum(r["layer_share"] * r["context"] for r in results)
            / max(1, sum(r["context"] for r in results)),
            "last_layer_share": sum(r["recomputed"] for r in results) / max(1, sum(r["context"] for r in results)),
            "context_tokens_mean": statistics.mean(r["context"] for r in results),
            "recomputed_tokens_mean": statistics.mean(r["recomputed"] for r in results),
            "token_agreement": sum(r["matches"] for r in results) / max(1, sum(r["reference"] for r in results)),
            # the same, over reference tokens that full prefill chose by a margin >= DECISIVE_MARGIN logits
            "decisive_agreement": sum(r["decisive_matches"] for r in results)
            / max(1, sum(r["decisive"] for r in results)),
            "decisive_share": sum(r["decisive"] for r in results) / max(1, sum(r["reference"] for r in results)),
            "first_token_kl": statistics.mean(r.get("kl", 0.0) for r in results),
            "questions": len(results),
        }
        if scorer is not None:
            scores = [scorer(r["text"], r["golds"]) for r in results]
            entry["em"] = statistics.mean(s[0] for s in scores)
            entry["f1"] = statistics.mean(s[1] for s in scores)
        # Per question, in the record shape eval.generation scores (run folders for the leaderboard).
        entry["per_question"] = [
            {"text": r["text"], "golds": r.get("golds", []), "ttft_s": r["ttft_s"], "kl": r.get("kl", 0.0),
             "agreement": r["matches"] / max(1, r["reference"]), "reference_tokens": r["reference"],
             "recomputed_tokens": r["recomputed"], "recompute_share": r["layer_share"],
             "context_tokens": r["context"], "kl_answer": r.get("kl_answer", 0.0), "matches": r["matches"],
             "decisive": r["decisive"], "decisive_matches": r["decisive_matches"], "probe_s": r["probe_s"]}
            for r in results]
        out[mode] = entry
    return out


def disk_load_speedup(rag, chunks: list[Chunk], repeats: int = 3) -> dict:
    """Seconds to encode a chunk (prefill behind the shared head, into memory) vs to read its KV back
    from a disk cache opened fresh (no memory tier holds it; files may sit in the OS page cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        writer = KVStore(Path(tmp), rag.fingerprint, host_bytes=0)
        encoder = ChunkReuse(rag.model, KVStore(None, rag.fingerprint, device=str(rag.model.device)), rag.keys)
        encoder.head()
        encode_s, load_s = [], []
        for chunk in chunks:
            start = time.perf_counter()
            with torch.inference_mode():
                kv = encoder.encode(chunk.token_ids)
            synchronize(rag.model.device)
            encode_s.append(time.perf_counter() - start)
            writer.put(rag.keys.shared(chunk.token_ids), kv)
        for _ in range(repeats):
            reader = KVStore(Path(tmp), rag.fingerprint, device=str(rag.model.device), host_bytes=0)
            for chunk in chunks:
                start = time.perf_counter()
                kv = reader.get(rag.keys.shared(chunk.token_ids))
                synchronize(rag.model.device)
                load_s.append(time.perf_counter() - start)
                assert kv is not None
        tokens = statistics.mean(len(c.token_ids) for c in chunks)
    return {"encode_s_median": statistics.median(encode_s), "load_s_median": statistics.median(load_s),
            "speedup": statistics.median(encode_s) / statistics.median(load_s), "chunk_tokens_mean": tokens,
            "chunk_bytes_mean": kv.nbytes()}


def sweep(rag, examples: list[dict], modes: list[str], counts: tuple[int, ...], tokens: int, questions: int,
          progress: Callable[[str], None]) -> dict:
    """TTFT and quality per mode at several chunk counts of `tokens`-token chunks."""
    out = {}
    for count in counts:
        items = [(ex["question"], passage_chunks(rag, ex, count, tokens, f"s{i}"), ex["answers"])
                 for i, ex in enumerate(examples[:questions])]
        progress(f"sweep: {count} chunks x {tokens} tokens")
        result = compare_modes(rag, items, modes, None, progress)
        out[f"{count}x{tokens}"] = {m: {k: v for k, v in r.items() if k in (
            "ttft_median_s", "speedup_vs_full", "speedup_vs_prefix", "token_agreement", "decisive_agreement",
            "first_token_kl",
            "recompute_share", "context_tokens_mean")} for m, r in result.items()}
    return out


def request_stream(n_queries: int, n_requests: int, seed: int = 0) -> list[int]:
    """Query indices drawn Zipf-like (weight 1/rank), so popular questions and their chunks recur."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(n_queries)]
    return rng.choices(range(n_queries), weights=weights, k=n_requests)


def retrieval_workload(make_rag: Callable[[str, str, int], object], requests: list[tuple[str, list[Chunk]]],
                       cap_bytes: int, progress: Callable[[str], None]) -> dict:
    """Serve the same request stream under full, prefix, and blend with LRU and value eviction."""
    out = {}
    variants = [("full", "lru"), ("prefix", "lru"), ("blend", "lru"), ("blend", "value")]
    for mode, eviction in variants:
        rag = make_rag(mode, eviction, cap_bytes)
        start = time.perf_counter()
        ttfts, hits, lookups = [], 0, 0
        for question, chunks in requests:
            answer = rag.answer(question, chunks)
            ttfts.append(answer.ttft_s)
            hits += answer.cache_hits
            lookups += len(chunks)
        elapsed = time.perf_counter() - start
        stats = rag.store.stats()
        name = mode if mode != "blend" else f"blend+{eviction}"
        out[name] = {"requests": len(requests), "seconds": elapsed, "throughput_rps": len(requests) / elapsed,
                     "ttft_median_s": statistics.median(ttfts),
                     "chunk_hit_rate": hits / lookups if mode != "full" else 0.0,
                     "cache_bytes": sum(t.get("bytes", 0) for t in stats["tiers"].values()),
                     "cap_bytes": cap_bytes}
        progress(f"workload b: {name}: {out[name]['throughput_rps']:.3f} req/s, hit rate "
                 f"{out[name]['chunk_hit_rate']:.2f}")
    for name, entry in out.items():
        entry["throughput_vs_full"] = entry["throughput_rps"] / out["full"]["throughput_rps"]
        entry["throughput_vs_prefix"] = entry["throughput_rps"] / out["prefix"]["throughput_rps"]
    return out


def musique_workload(rag, examples: list[dict], modes: list[str], n_chunks: int, scorer: Scorer,
                     progress: Callable[[str], None], offset: int = 0) -> dict:
    items = [(ex["question"], passage_chunks(rag, ex, n_chunks, None, f"q{offset + i}"), ex["answers"])
             for i, ex in enumerate(examples)]
    return compare_modes(rag, items, modes, scorer, progress)


def run_bench(generator: dict, cache: dict, musique: Path, limit: int | None, modes: list[str], n_chunks: int,
              sweep_counts: tuple[int, ...], sweep_tokens: int, sweep_questions: int,
              retrieval_requests: list[tuple[str, list[Chunk]]] | None, retrieval_cap_bytes: int,
              scorer: Scorer, progress: Callable[[str], None], offset: int = 0) -> dict:
    """Both workloads; settings are the generator and cache config dicts (the cache is memory-only here)."""
    from generators.rag import RagGenerator

    memory_only = {**cache, "dir": "", "host_bytes": max(cache["host_bytes"], 2 << 30)}
    rag = RagGenerator(generator, memory_only)
    examples = load_musique(musique, limit, offset)
    result = {"settings": {"model": generator["model"], "ratio": cache["ratio"], "full_layers": cache["full_layers"],
                           "ape": [cache["ape_temperature"], cache["ape_scale"]], "craft_alpha": cache["craft_alpha"],
                           "max_new_tokens": generator["max_new_tokens"], "questions": len(examples),
                           "offset": offset, "epic_tokens": cache["epic_tokens"],
                           "chunks": n_chunks, "threads": torch.get_num_threads(), "device": str(rag.model.device),
                           "dtype": rag.keys.dtype}}
    progress(f"workload a: {len(examples)} MuSiQue questions (from question {offset}) x {n_chunks} passages")
    result["modes"] = musique_workload(rag, examples, modes, n_chunks, scorer, progress, offset)
    result["disk"] = disk_load_speedup(rag, passage_chunks(rag, examples[0], 3, None, "disk"))
    result["disk_load_speedup_vs_recompute"] = result["disk"]["speedup"]
    if sweep_counts:
        result["sweep"] = sweep(rag, examples, modes, sweep_counts, sweep_tokens, sweep_questions, progress)
    if retrieval_requests:
        def make_rag(mode: str, eviction: str, cap: int):
            return RagGenerator({**generator}, {**cache, "dir": "", "mode": mode, "eviction": eviction,
                                                "host_bytes": cap})

        result["retrieval"] = retrieval_workload(make_rag, retrieval_requests, retrieval_cap_bytes, progress)
    return result


@dataclass
class CacheBenchSettings:
    musique: Path = Path("data/musique/musique_s.json.gz")  # the MuSiQue sample of workload (a)
    limit: int | None = None  # its questions (None: all)
    offset: int = 0  # questions skipped first (blend's defaults were tuned on the first 24)
    modes: list[str] = dataclasses.field(default_factory=lambda: ["full", "blend"])  # blend@R: blend at ratio R
    chunks: int = 10  # passages per question
    sweep_questions: int = 2  # per point of the 5/10/20 x 256-token sweep (0 skips it)
    requests: int = 40  # workload (b)'s request stream (0 skips it)
    cap_bytes: int = 256 << 20  # workload (b)'s host cache budget
    stream_config: Path = Path("configs/scifact-bm25.toml")  # whose queries and retrieved chunks make workload (b)
    runs_dir: Path | None = None  # also one run folder per mode, for `ragkit report`


def run_from_config(cfg, settings: CacheBenchSettings, options) -> dict:
    """The bench under a pipeline config's generator and cache settings (`options`: ragkit.bench.BenchOptions)."""
    from eval.answers import exact_match, token_f1
    from ragkit.errors import InputError

    if not settings.musique.is_file():
        raise InputError(settings.musique, "MuSiQue sample not found",
                         hint="run from the ragkit checkout or pass --musique")
    torch.set_num_threads(options.threads)
    retrieval_requests = None
    if settings.requests:
        from ragkit.pipeline import Pipeline

        pipe = Pipeline.from_config(settings.stream_config, progress=False)
        queries = pipe.queries()[:max(10, settings.requests // 2)]
        order = request_stream(len(queries), settings.requests)
        hits = pipe.retrieve_batch([q.text for q in queries], 5)
        retrieval_requests = [(queries[i].text, [pipe.chunk(h.id) for h in hits[i]]) for i in order]
    result = run_bench(
        dataclasses.asdict(cfg.generator), dataclasses.asdict(cfg.cache), settings.musique, settings.limit,
        settings.modes, settings.chunks, (5, 10, 20) if settings.sweep_questions else (), 256,
        settings.sweep_questions, retrieval_requests, settings.cap_bytes,
        lambda pred, golds: (exact_match(pred, golds), token_f1(pred, golds)), options.log, settings.offset)
    if settings.runs_dir is not None:
        write_mode_runs(settings.runs_dir, cfg, result["modes"])
    return result


def write_mode_runs(runs_dir: Path, cfg, modes: dict) -> None:
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


def format_report(result: dict) -> str:
    settings = result["settings"]
    lines = [f"workload a: MuSiQue, {settings['questions']} questions from question {settings.get('offset', 0)} x "
             f"{settings['chunks']} passages, {settings['device']} {settings['dtype']}, {settings['threads']} thread(s)"
             "; recomp = chunk rows computed over all layers (leading full layers included)",
             f"{'mode':<11}{'TTFT med':>10}{'p90':>9}{'vs full':>9}{'vs prefix':>10}{'recomp':>8}{'agree':>7}"
             f"{'decis.':>7}{'KL1':>8}{'EM':>6}{'F1':>6}"]
    for mode, r in result["modes"].items():
        vs_prefix = f"{r['speedup_vs_prefix']:>9.2f}x" if r["speedup_vs_prefix"] is not None else f"{'-':>10}"
        lines.append(f"{mode:<11}{r['ttft_median_s']:>9.3f}s{r['ttft_p90_s']:>8.3f}s{r['speedup_vs_full']:>8.2f}x"
                     f"{vs_prefix}{r['recompute_share']:>8.3f}{r['token_agreement']:>7.3f}"
                     f"{r['decisive_agreement']:>7.3f}{r['first_token_kl']:>8.4f}{r.get('em', 0):>6.3f}{r.get('f1', 0):>6.3f}")
    d = result["disk"]
    lines.append(f"disk load vs recompute: {d['load_s_median'] * 1000:.1f} ms vs {d['encode_s_median'] * 1000:.1f} ms "
                 f"per {d['chunk_tokens_mean']:.0f}-token chunk -> {d['speedup']:.1f}x")
    for size, modes in result.get("sweep", {}).items():
        lines.append(f"sweep {size}: " + "  ".join(
            f"{m} {r['speedup_vs_full']:.1f}x/{r['token_agreement']:.2f}/{r['first_token_kl']:.3f}"
            for m, r in modes.items()) + "   (speedup vs full / agreement / KL1)")
    for name, r in result.get("retrieval", {}).items():
        lines.append(f"workload b {name:<12} {r['throughput_rps']:.3f} req/s ({r['throughput_vs_full']:.2f}x full, "
                     f"{r['throughput_vs_prefix']:.2f}x prefix)  hit rate {r['chunk_hit_rate']:.2f}  "
                     f"cache {r['cache_bytes'] / 2**20:.0f} MiB of {r['cap_bytes'] / 2**20:.0f} MiB  "
                     f"TTFT median {r['ttft_median_s']:.2f}s")
    return "\n".join(lines)
