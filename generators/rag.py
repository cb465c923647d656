"""Answer a question from retrieved chunks, reusing each chunk's stored KV (the pipeline's generator).

Settings arrive as plain dicts (the asdict() of ragkit.config's GeneratorConfig and CacheConfig)
so that this component does not depend on the config module.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from chunk_cache.assembly import CHUNK, assemble, encode_chunk, encode_prefix
from chunk_cache.reuse import MODES, ReuseSettings, prefill
from chunk_cache.store import CacheKey, ChunkKV, KVStore
from generators.generate import Sampling, decode
from generators.model import Decoder, load_decoder
from generators.prompt import ChatPrompt
from generators.weights import load_tokenizer, model_fingerprint, resolve_model_dir
from ragkit.errors import ConfigError
from ragkit.types import Chunk, token_hash


# Aliases kept for entries stored under an exact prefix (oldest dropped first): far more chunks than
# any byte budget holds (65k chunks of 300 tokens are ~900 GB of fp32 KV for SmolLM2-135M).
MAX_ALIASES = 65536


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


DTYPES = ["auto", "float32", "bfloat16", "float16"]


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
    if dtype not in DTYPES:
        raise ConfigError("generator.dtype", f"unknown dtype {dtype!r}", allowed=DTYPES)
    return setting, getattr(torch, dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a wall-clock time covers it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RagGenerator:
    def __init__(self, generator: dict, cache: dict, store: KVStore | None = None):
        if cache.get("mode") not in MODES:
            raise ConfigError("cache.mode", f"unknown value {cache.get('mode')!r}", allowed=MODES)
        device, dtype = pick_device(generator.get("device", "auto"), generator.get("dtype", "auto"))
        folder = resolve_model_dir(generator["model"])
        self.model: Decoder = load_decoder(folder, device, dtype)
        self.prompt = ChatPrompt(load_tokenizer(str(folder)), generator["system_prompt"])
        self.max_new_tokens = int(generator["max_new_tokens"])
        self.sampling = Sampling(float(generator.get("temperature", 0.0)), float(generator.get("top_p", 1.0)),
                                 int(generator.get("seed", 0)))  # the run's seed, so a sampled answer reproduces
        self.settings = ReuseSettings(mode=cache["mode"], ratio=cache["ratio"], full_layers=cache["full_layers"],
                                      ape_temperature=cache["ape_temperature"], ape_scale=cache["ape_scale"],
                                      craft_alpha=cache["craft_alpha"])
        self.fingerprint = model_fingerprint(self.model)
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.store = store if store is not None else KVStore(
            Path(cache["dir"]) if cache.get("dir") else None, self.fingerprint, device=device,
            device_bytes=cache["device_bytes"], host_bytes=cache["host_bytes"], disk_bytes=cache["disk_bytes"],
            eviction=cache["eviction"])
        self.head_hash = token_hash(self.prompt.head_ids)
        # Rows a request computed for a missed chunk are stored as they are (LMCache, Cache-Craft). Behind
        # an exact prefix they are exact there and go under that prefix's key; behind a reused, inexact
        # chunk they are exact nowhere and go under this marker, looked up only for inexact reuse.
        self.in_context_hash = self.head_hash + "+context"
        # The exact-prefix keys this process stored such rows under, so that other prompts can still
        # reuse them inexactly: one entry serves both, its bytes counted once.
        self._computed_under: dict[str, CacheKey] = {}
        self._prefix_kv: ChunkKV | None = None

    # --- cache keys and entries ------------------------------------------------------------

    def key(self, prefix_hash: str, chunk_ids: Iterable[int]) -> CacheKey:
        return CacheKey(self.fingerprint, self.dtype_name, prefix_hash, token_hash(chunk_ids))

    def prefix_kv(self) -> ChunkKV:
        """The shared prefix's KV: stored like a chunk encoded behind nothing."""
        if self._prefix_kv is None:
            key = self.key(token_hash([]), self.prompt.head_ids)
            kv = self.store.get(key)
            if kv is None:
                kv = encode_prefix(self.model, self.prompt.head_ids)
                self.store.put(key, kv)
            self._prefix_kv = kv
        return self._prefix_kv

    def _reusable(self, chunk_ids: tuple[int, ...], tried: CacheKey | None) -> ChunkKV | None:
        """An entry to reuse inexactly: the chunk encoded behind the shared prefix, else rows an earlier
        request computed for it (skipping `tried`, the exact key already looked up)."""
        shared = self.key(self.head_hash, chunk_ids)
        in_context = dataclasses.replace(shared, prefix_hash=self.in_context_hash)
        for key in (shared, in_context, self._computed_under.get(shared.chunk_hash)):
            if key is not None and key != tried:
                kv = self.store.get(key)
                if kv is not None:
                    return kv
        return None

    def _remember_exact(self, key: CacheKey) -> None:
        """Note that the chunk's latest in-request rows lie under this exact-prefix key."""
        self._computed_under.pop(key.chunk_hash, None)  # re-inserted as the newest
        self._computed_under[key.chunk_hash] = key
        if len(self._computed_under) > MAX_ALIASES:
            del self._computed_under[next(iter(self._computed_under))]

    @torch.inference_mode()
    def encode(self, chunk_ids: tuple[int, ...]) -> ChunkKV:
        """Encode one chunk behind the shared prefix and store it."""
        start = time.perf_counter()
        kv = encode_chunk(self.model, self.prefix_kv(), chunk_ids)
        synchronize(self.model.device)
        self.store.put(self.key(self.head_hash, chunk_ids), kv, recompute_cost_s=time.perf_counter() - start)
        return kv

    def warm(self, chunks: Iterable[Chunk], progress: bool = True) -> int:
        """Encode and store every chunk not yet cached; returns how many were computed."""
        from tqdm import tqdm

        computed = 0
        seen: set[str] = set()
        for chunk in tqdm(list(chunks), desc="warming KV cache", unit="chunk", disable=not progress):
            key = self.key(self.head_hash, chunk.token_ids)
            if key.chunk_hash in seen or key in self.store:
                continue
            seen.add(key.chunk_hash)
            self.encode(tuple(chunk.token_ids))
            computed += 1
        return computed

    # --- answering -------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, question: str, chunks: list[Chunk], mode: str | None = None, extra: int | None = None,
                **overrides):
        """Look up, assemble and prefill one prompt under the configured settings, or `mode` and other
        ReuseSettings fields overridden. Returns (logits [V], cache, next position, stats dict)."""
        settings = dataclasses.replace(self.settings, **overrides, **({"mode": mode} if mode else {}))
        segments = self.prompt.segments(question, chunks)
        entries: dict[int, ChunkKV] = {}
        exact: set[int] = set()
        misses: list[tuple[int, CacheKey]] = []  # chunks computed in place, stored afterwards under the key
        if settings.mode != "full":
            entries[0], exact = self.prefix_kv(), {0}
            before: list[int] = list(segments[0].token_ids)
            leading = True  # every row so far is what full prefill computes (found exact, or computed here)
            for index, seg in enumerate(segments[1:], start=1):
                if seg.kind == CHUNK:
                    exact_key = self.key(token_hash(before), seg.token_ids)
                    kv = self.store.get(exact_key) if leading else None
                    if kv is not None:  # encoded behind exactly the tokens now before it
                        entries[index] = kv
                        exact.add(index)
                    else:
                        if settings.mode != "prefix":  # prefix caches reuse exact prefixes only
                            kv = self._reusable(seg.token_ids, exact_key if leading else None)
                        if kv is None and settings.mode == "ape":  # APE cannot compute a chunk in place
                            kv = self.encode(seg.token_ids)
                        if kv is None:  # computed here: exact behind an exact prefix, else context-dependent
                            misses.append((index, exact_key if leading else
                                           self.key(self.in_context_hash, seg.token_ids)))
                        else:  # reused inexactly: no row after it is what full prefill computes
                            entries[index] = kv
                            leading = False
                    leading = leading and settings.mode != "ape"  # APE's chunks sit side by side, not in a row
                before.extend(seg.token_ids)
        extra = self.max_new_tokens + 1 if extra is None else extra
        layout, cache = assemble(self.model, segments, entries, exact, extra, parallel=settings.mode == "ape")
        result = prefill(self.model, layout, cache, segments, settings)
        next_position = int(layout.positions[-1]) + 1
        stats = {"cache_hits": sum(1 for i in entries if i != 0), "context_tokens": result.context,
                 "recomputed_tokens": result.recomputed_context,
                 "misses": [(layout.spans[i], int(layout.positions[layout.spans[i][0]]), key) for i, key in misses],
                 "mode": settings.mode}
        return result.logits, cache, next_position, stats

    def answer(self, question: str, chunks: list[Chunk], on_token: Callable[[str], None] | None = None,
               mode: str | None = None) -> Answer:
        start = time.perf_counter()
        logits, cache, next_position, stats = self.prefill(question, chunks, mode)
        synchronize(self.model.device)
        ttft = time.perf_counter() - start
        stream = None
        if on_token is not None:
            tokenizer = self.prompt.tokenizer

            def stream(_row: int, token: int) -> None:
                on_token(tokenizer.decode([token]))

        tokens = decode(self.model, cache, logits[None], torch.tensor([next_position]), self.max_new_tokens,
                        self.prompt.stop_ids, self.sampling, stream)[0]
        total = time.perf_counter() - start
        rows = max(1, stats["context_tokens"])
        # Store what this request computed, for the next one: a miss costs one computation, not two.
        for (s, e), position, key in stats["misses"]:
            self.store.put(key, ChunkKV(cache.keys[:, 0, :, s:e].clone(), cache.values[:, 0, :, s:e].clone(),
                                        start=position), recompute_cost_s=ttft * (e - s) / rows)
            if key.prefix_hash not in (self.head_hash, self.in_context_hash):
                self._remember_exact(key)
        return Answer(text=self.prompt.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                      chunk_ids=[c.id for c in chunks], ttft_s=ttft, total_s=total, mode=stats["mode"],
                      cache_hits=stats["cache_hits"], context_tokens=stats["context_tokens"],
                      recomputed_tokens=stats["recomputed_tokens"], tokens=tokens)

    @torch.inference_mode()
    def teacher_force(self, question: str, chunks: list[Chunk], reference: list[int], mode: str | None = None,
                      **overrides) -> tuple[torch.Tensor, list[int]]:
        """Prefill under `mode`, then feed `reference` token by token: the first-token logits [V] and the
        greedy token predicted at each step (len(reference) of them), for agreement with another mode."""
        logits, cache, next_position, _stats = self.prefill(question, chunks, mode, extra=len(reference) + 1,
                                                            **overrides)
        steps = [logits[None]]
        if len(reference) > 1:
            start = cache.length
            rows = torch.tensor([reference[:-1]], device=self.model.device)
            slots = torch.arange(start, start + rows.shape[1], device=self.model.device)
            steps.append(self.model.forward(rows, (next_position + slots - start)[None], cache, slots,
                                            logits_rows=slice(None))[0])
        return logits, torch.cat(steps).argmax(-1).tolist()

    def answer_batch(self, questions: list[str], chunks: list[list[Chunk]]) -> list[Answer]:
        """One answer per question; prompts differ in their chunks, so each is assembled on its own."""
        if len(questions) != len(chunks):
            raise ValueError("answer_batch needs one chunk list per question")
        return [self.answer(q, c) for q, c in zip(questions, chunks)]
