"""Answer a question from retrieved chunks, reusing each chunk's stored KV (the pipeline's generator).

The reuse path lives in chunk_cache.reuse (plan -> assemble -> recompute -> commit); this module
builds the prompt, runs that path, decodes and commits. Settings arrive as plain dicts (the
asdict() of ragkit.config's GeneratorConfig and CacheConfig), so this component does not depend on
the config module.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from chunk_cache.assembly import CHUNK, Segment
from chunk_cache.dtypes import GENERATOR_DTYPES
from chunk_cache.entries import EntrySource
from chunk_cache.keys import KeyScheme
from chunk_cache.modes import ReuseSettings, make_mode
from chunk_cache.reuse import ChunkReuse
from chunk_cache.store import KVStore
from generators.choices import Scored, choice_ids, choice_logliks, pick
from generators.generate import Sampling, decode, teacher_forced_logits
from generators.model import Decoder, load_decoder
from generators.prompt import ChatPrompt
from generators.weights import load_tokenizer, model_fingerprint, model_info
from ragkit.errors import ConfigError, InputError
from ragkit.types import Chunk


@dataclass
class Answer:
    text: str
    chunk_ids: list[str]
    ttft_s: float
    total_s: float
    mode: str
    cache_hits: int
    context_tokens: int
    recomputed_tokens: int
    tokens: list[int]
    recompute_share: float = 0.0  # chunk rows computed over every layer / (layers x chunk rows)
    first_logits: torch.Tensor | None = field(default=None, repr=False)  # [V], with keep_logits
    forced: list[int] | None = None  # greedy token after each prefix of a `forced` reference, from the same prefill


@dataclass
class ChoiceAnswer(Answer):
    """A closed-form answer: `text` is the best choice; `scored` holds every choice's log-likelihood."""

    scored: Scored = field(default_factory=Scored)


def pick_device(setting: str, dtype: str = "auto") -> tuple[str, torch.dtype]:
    """`auto`: CUDA in bf16 when present, else CPU in fp32; an explicit `dtype` overrides the precision."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("generator.device", "CUDA is not available on this machine", allowed=["auto", "cpu"])
    if setting != "cpu" and not setting.startswith("cuda"):
        raise ConfigError("generator.device", f"unknown device {setting!r}", allowed=["auto", "cpu", "cuda"])
    if dtype == "auto":
        return setting, (torch.bfloat16 if setting.startswith("cuda") else torch.float32)
    if dtype not in GENERATOR_DTYPES:
        raise ConfigError("generator.dtype", f"unknown dtype {dtype!r}", allowed=list(GENERATOR_DTYPES))
    return setting, getattr(torch, dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a wall-clock time covers it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RagGenerator:
    def __init__(self, generator: dict, cache: dict, store: KVStore | None = None):
        make_mode(cache.get("mode"))  # the registry refuses an unknown mode before the model loads
        device, dtype = pick_device(generator.get("device", "auto"), generator.get("dtype", "auto"))
        self.info = model_info(generator["model"])  # config.json, read once
        self.model: Decoder = load_decoder(self.info, device, dtype)  # refuses a bad folder, naming what is wrong
        self.prompt = ChatPrompt(load_tokenizer(str(self.info.folder)), generator["system_prompt"], self.info.eos_ids)
        self.max_new_tokens = int(generator["max_new_tokens"])
        self.sampling = Sampling(float(generator.get("temperature", 0.0)), float(generator.get("top_p", 1.0)),
                                 int(generator.get("seed", 0)))  # the run's seed, so a sampled answer reproduces
        self.choices = list(generator.get("choices") or [])  # closed form for every query without its own
        self.choice_norm = generator.get("choice_norm", "none")
        if self.choices:
            choice_ids(self.prompt.ids, self.choices, "config key 'generator.choices'")
        fields = {f.name for f in dataclasses.fields(ReuseSettings)}
        self.settings = ReuseSettings(**{k: v for k, v in cache.items() if k in fields})
        self.choice_ratio = float(cache.get("choice_ratio") or 0.0)  # scoring choices: this `ratio` (0: the same)
        self.fingerprint = model_fingerprint(self.info, dtype)
        self.keys = KeyScheme(self.fingerprint, str(dtype).removeprefix("torch."), self.prompt.head_ids)
        self.reuse = ChunkReuse(self.model, store if store is not None else KVStore(
            Path(cache["dir"]) if cache.get("dir") else None, self.fingerprint, device=device,
            device_bytes=cache["device_bytes"], host_bytes=cache["host_bytes"], disk_bytes=cache["disk_bytes"],
            eviction=cache["eviction"], write_behind=True), self.keys)

    @property
    def store(self) -> KVStore:
        return self.reuse.store

    @store.setter
    def store(self, store: KVStore) -> None:
        """Serve from another store (a bench's capped cache, say): the reuse path starts over on it."""
        self.reuse = ChunkReuse(self.model, store, self.keys)

    def warm(self, chunks: Iterable[Chunk], progress: bool = True, primers: Sequence[Chunk] = ()) -> int:
        """Encode and store every chunk not yet cached behind the shared head and, given `primers`, behind the
        head and the primers (chunk_cache.primer); returns how many chunks were computed, once they are on disk
        (the store writes while the next chunk is encoded)."""
        from tqdm import tqdm

        computed = 0
        seen: set[tuple[int, ...]] = set()
        for chunk in tqdm(list(chunks), desc="warming KV cache", unit="chunk", disable=not progress):
            ids = tuple(chunk.token_ids)
            if ids in seen:
                continue
            seen.add(ids)
            behind_primer = self.primed_segments(chunk, primers)
            shared = self.keys.shared(ids) not in self.store
            primed = behind_primer is not None and self.reuse.exact_keys(behind_primer)[
                len(behind_primer) - 1] not in self.store
            with torch.inference_mode():
                if shared:
                    self.reuse.encode(ids)
                if primed:
                    self.reuse.encode_behind(behind_primer)
            computed += shared or primed
        self.store.flush()
        return computed

    def primed_segments(self, chunk: Chunk, primers: Sequence[Chunk]) -> list[Segment] | None:
        """The prompt's segments up to `chunk` when it follows the `primers` but itself (None without any)."""
        before = [p for p in primers if tuple(p.token_ids) != tuple(chunk.token_ids)]
        if not before:
            return None
        segments = self.prompt.segments("", [*before, chunk])
        return segments[:max(i for i, seg in enumerate(segments) if seg.kind == CHUNK) + 1]

    @torch.inference_mode()
    def prefill(self, question: str, chunks: list[Chunk], mode: str | None = None, extra: int | None = None,
                source: EntrySource | None = None, **overrides):
        """Plan, assemble and recompute one prompt under the configured settings, or `mode` and other
        ReuseSettings fields overridden; `source` is where entries are read (default: the store).
        Returns (logits [V], cache, next position, stats dict)."""
        settings = dataclasses.replace(self.settings, **overrides, **({"mode": mode} if mode else {}))
        extra = self.max_new_tokens + 1 if extra is None else extra
        plan, prefilled, layout, cache = self.reuse.prefill(self.prompt.segments(question, chunks), settings, extra,
                                                            source)
        stats = {"cache_hits": sum(1 for i in plan.entries if i != 0), "context_tokens": prefilled.chunk_rows,
                 "recomputed_tokens": prefilled.recomputed, "recompute_share": prefilled.recompute_share,
                 "mode": settings.mode, "probe_s": prefilled.probe_s,
                 # commit(prefill_seconds): store the chunks computed here, once the first token is out
                 "commit": functools.partial(self.reuse.commit, plan, layout, cache, prefilled, source=source)}
        return prefilled.logits, cache, int(layout.positions[-1]) + 1, stats

    def answer(self, question: str, chunks: list[Chunk], on_token: Callable[[str], None] | None = None,
               mode: str | None = None, keep_logits: bool = False, max_new_tokens: int | None = None,
               sampling: Sampling | None = None, stop_ids: frozenset[int] | None = None,
               forced: list[int] | None = None, source: EntrySource | None = None) -> Answer:
        """One sequence alone: prefill with reuse, store what was computed (disk writes overlap decoding),
        decode, and return once the stored chunks are on disk. Per-answer settings default to the
        generator's; `keep_logits` keeps the first token's logits on the Answer (a reference for KL without
        a second prefill); `forced` teacher-forces a reference from the same prefill (Answer.forced)."""
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        start = time.perf_counter()
        logits, cache, next_position, stats = self.prefill(question, chunks, mode,
                                                           extra=max(budget, len(forced or ())) + 1, source=source)
        synchronize(self.model.device)
        ttft = time.perf_counter() - start
        stats["commit"](ttft)  # a miss costs one computation, in this process or any other
        written = self.store.written()
        predicted = self.teacher_forced(cache, logits, next_position, forced) if forced else None
        stream = None
        if on_token is not None:
            tokenizer = self.prompt.tokenizer

            def stream(_row: int, token: int) -> None:
                on_token(tokenizer.decode([token]))

        tokens = decode(self.model, cache, logits[None], torch.tensor([next_position]), budget,
                        self.prompt.stop_ids if stop_ids is None else stop_ids, sampling or self.sampling, stream)[0]
        self.store.wait_written(written)  # its chunks on disk before the answer is returned (overlapped decoding)
        answer = self.make_answer(tokens, chunks, stats, ttft, time.perf_counter() - start)
        answer.first_logits = logits.cpu() if keep_logits else None
        answer.forced = predicted
        return answer

    def choose(self, question: str, chunks: list[Chunk], choices: list[str] | None = None,
               mode: str | None = None) -> ChoiceAnswer:
        """Prefill with reuse as `answer` does, then score every choice (default: generator.choices) by its
        log-likelihood after the prompt, in one batched forward (generators.choices); the answer is the best
        under generator.choice_norm, prefilled at cache.choice_ratio when set. TTFT is the prefill's; total_s
        includes the scoring."""
        choices = list(choices or self.choices)
        ids = choice_ids(self.prompt.ids, choices, "choices")
        start = time.perf_counter()
        logits, cache, next_position, stats = self.prefill(question, chunks, mode, extra=0, **self.choice_settings())
        synchronize(self.model.device)
        ttft = time.perf_counter() - start
        scored = pick(choices, ids, choice_logliks(self.model, cache, logits, next_position, ids), self.choice_norm)
        synchronize(self.model.device)
        total = time.perf_counter() - start
        stats["commit"](ttft)
        answer = self.make_answer(list(ids[scored.best]), chunks, stats, ttft, total)
        return ChoiceAnswer(**{**vars(answer), "text": scored.text}, scored=scored)

    def choice_settings(self) -> dict:
        """The ReuseSettings overrides closed-form scoring prefills with (cache.choice_ratio)."""
        return {"ratio": self.choice_ratio} if self.choice_ratio else {}

    def teacher_forced(self, cache, logits: torch.Tensor, next_position: int, forced: list[int]) -> list[int]:
        """The greedy token after the prompt and after each prefix of `forced`, written past the prompt's rows
        and then forgotten (the cache is rewound), so decoding from the same prefill goes on unchanged."""
        prompt_rows = cache.length
        predicted = teacher_forced_logits(self.model, cache, logits, next_position, forced).argmax(-1).tolist()
        cache.length = prompt_rows
        return predicted

    def check_fits(self, question: str, chunks: list[Chunk], max_new_tokens: int) -> None:
        """Refuse a prompt that, with `max_new_tokens` of answer, passes the model's context (ModelInfo)."""
        needed, limit = self.prompt.size(question, chunks) + max_new_tokens, self.info.context_length
        if needed > limit:
            raise InputError(self.info.folder, f"the prompt needs {needed} tokens ({len(chunks)} chunks, answer "
                             f"{max_new_tokens}), more than the model's context of {limit}",
                             hint="shorten the question, or lower generator.chunks, chunking.size or "
                                  "generator.max_new_tokens")

    def make_answer(self, tokens: list[int], chunks: list[Chunk], stats: dict, ttft: float, total: float) -> Answer:
        """The Answer of decoded `tokens` after a prefill that returned `stats`."""
        return Answer(text=self.prompt.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                      chunk_ids=[c.id for c in chunks], ttft_s=ttft, total_s=total, mode=stats["mode"],
                      cache_hits=stats["cache_hits"], context_tokens=stats["context_tokens"],
                      recomputed_tokens=stats["recomputed_tokens"], tokens=tokens,
                      recompute_share=stats["recompute_share"])

    def forced_reference(self, tokens: list[int]) -> list[int]:
        """An answer's tokens as a reference to teacher-force: with the stop token it ended on, if it stopped
        before the token budget (so agreement also counts stopping at the same place)."""
        eos = self.prompt.tokenizer.eos_token_id
        stop = eos if eos in self.prompt.stop_ids else min(self.prompt.stop_ids)
        return list(tokens) + ([stop] if len(tokens) < self.max_new_tokens else [])

    @torch.inference_mode()
    def teacher_force(self, question: str, chunks: list[Chunk], reference: list[int], mode: str | None = None,
                      **overrides) -> tuple[torch.Tensor, list[int]]:
        """Prefill under `mode`, then feed `reference` token by token: the first-token logits [V] and the
        greedy token predicted at each step (len(reference) of them), for agreement with another mode."""
        logits, cache, next_position, _stats = self.prefill(question, chunks, mode, extra=len(reference) + 1,
                                                            **overrides)
        forced = teacher_forced_logits(self.model, cache, logits, next_position, reference)
        return logits, forced.argmax(-1).tolist()
