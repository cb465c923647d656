"""Batched answering: many questions in flight, grouped by the chunks they share, decoded together.

Decoding is memory bound on a CPU (each step reads the weights and every sequence's KV), so one step
for many sequences costs little more than one for a single sequence; prefill is compute bound, so it
gains from chunk reuse, not from batching. The engine therefore:

- orders the queue so that questions with overlapping chunk sets run together (BatchLLM's global
  grouping of shared prefixes, applied to chunks: `group_order`);
- fetches the store entries a group will look up once, on a background thread while the previous
  group decodes (`ChunkReuse.lookup_many`), and holds them until the group is prefilled
  (chunk_cache.reuse.HeldEntries); entries in host memory stay there, and each prefill uploads what it
  reuses layer by layer (chunk_cache.upload);
- prefills each admitted question on its own through `RagGenerator.prefill` (any reuse mode) and
  commits its missed chunks at once: memory holds them before the next question is planned, so it finds
  them as it would one at a time, and the store writes them to disk while the batch decodes; a request
  is reported answered only once its own writes are on disk (chunk_cache.writer);
- copies the prompt KV into a free row of one right-padded batch cache (slots past a row's length
  carry position -1 and are never attended) and decodes one token for every row per `step`, each
  row with its own stop tokens and budget. A finished row leaves at once (the last row moves into
  its place) and queued requests join between steps, within `max_batch` rows and `max_kv_bytes`.

Everything a request may set (mode, token budget, temperature, stop tokens, streaming, a reference to
teacher-force) travels on its `Request`; the generator is never reconfigured. A server calls `submit`
and `step` in its own loop (`cancel` for a request nobody waits for, `stop` for one whose output ended
on the caller's terms); `run` answers a list. A mode whose chunks sit at shared positions (the
registry's `parallel` trait: APE) attends to them with a temperature carried by its cache (one context
mask per cache, not per row), so such requests are answered alone when they reach the head of the queue.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from chunk_cache.modes import make_mode
from chunk_cache.entries import HeldEntries, Lookups
from generators.generate import Sampling, decode_step, pick
from generators.model import KVCache
from generators.rag import Answer, RagGenerator, synchronize
from ragkit.types import Chunk


@dataclass
class Request:
    question: str
    chunks: list[Chunk]
    mode: str | None = None  # None: the generator's configured mode
    max_new_tokens: int | None = None  # None: the generator's
    stop_ids: frozenset[int] | None = None  # None: the prompt's end-of-turn tokens
    temperature: float | None = None  # None: the generator's
    on_token: Callable[[str], None] | None = None
    keep_logits: bool = False  # keep the first token's logits on the Answer
    forced: list[int] | None = None  # a reference to teacher-force from the same prefill (Answer.forced)


@dataclass
class _Sequence:
    ticket: int
    request: Request
    logits: torch.Tensor  # [V]: the next token's logits
    position: int  # RoPE position of the next token
    length: int  # slots its row holds
    budget: int
    stops: frozenset[int]
    stats: dict
    started: float
    ttft: float
    sampling: Sampling
    rng: torch.Generator | None
    written: int  # the store's write ticket after this request's commit
    first_logits: torch.Tensor | None
    forced: list[int] | None
    tokens: list[int] = field(default_factory=list)
    done: bool = False


def group_order(chunk_sets: list[set[str]], group_size: int) -> list[int]:
    """Request indices, ordered so that requests sharing chunks are neighbours.

    Greedy: a group starts from the waiting request whose chunks recur most often overall, then takes
    the request sharing most chunks with the group so far, until it holds `group_size` requests; ties
    keep submission order. Requests sharing nothing follow in submission order.
    """
    holders: dict[str, list[int]] = {}
    for index, chunks in enumerate(chunk_sets):
        for chunk in chunks:
            holders.setdefault(chunk, []).append(index)
    popularity = [sum(len(holders[c]) - 1 for c in chunks) for chunks in chunk_sets]
    waiting = set(range(len(chunk_sets)))
    order: list[int] = []
    while waiting:
        seed = min(waiting, key=lambda i: (-popularity[i], i))
        group, covered, overlap = [seed], set(), {}
        waiting.discard(seed)
        while True:
            for chunk in chunk_sets[group[-1]] - covered:
                covered.add(chunk)
                for other in holders[chunk]:
                    if other in waiting:
                        overlap[other] = overlap.get(other, 0) + 1
            if len(group) == group_size or not overlap:
                break
            best = min(overlap, key=lambda i: (-overlap[i], i))
            del overlap[best]
            group.append(best)
            waiting.discard(best)
        order.extend(group)
    return order


class AnswerEngine:
    """Continuous batching over a `RagGenerator`: `submit` requests, call `step` until `idle`.

    max_batch: sequences decoded together. max_kv_bytes: bound on the batch cache (rows x slots x
    bytes per slot); a request that does not fit waits, except when nothing else is running.
    prefill: what prefills a request, `rag.prefill` unless given (a benchmark passes a memo).
    """

    def __init__(self, rag: RagGenerator, max_batch: int = 16, max_kv_bytes: int | None = None,
                 prefill: Callable | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.rag = rag
        self.model = rag.model
        self.max_batch = max_batch
        self.max_kv_bytes = max_kv_bytes
        self._prefill = prefill or rag.prefill
        args = self.model.args
        self.slot_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * self.model.dtype.itemsize
        self.queue: list[tuple[int, Request]] = []
        self.rows: list[_Sequence] = []  # rows[i] decodes in row i of the batch cache
        self.cache: KVCache | None = None
        self.held = HeldEntries(rag.store)
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-prefetch")
        self._prefetch: Future | None = None
        self._prefetched: set[int] = set()  # tickets whose keys were fetched or are being fetched
        self._lookups: dict[int, Lookups] = {}  # queued ticket -> what its plan may read, computed once
        self._tickets = 0
        # what a caller may report: seconds in batched decode steps, the largest batch and batch cache
        self.decode_s = 0.0
        self.peak_rows = 0
        self.peak_kv_bytes = 0

    # --- the serving loop -------------------------------------------------------------------

    def submit(self, request: Request) -> int:
        """Queue a request; returns its ticket (step() reports answers by ticket). A prompt that cannot fit
        the model's context with its answer is refused here (InputError), before it takes a row."""
        self.rag.check_fits(request.question, request.chunks, self._budget(request))
        ticket = self._tickets
        self._tickets += 1
        self.queue.append((ticket, request))
        return ticket

    @property
    def idle(self) -> bool:
        return not self.queue and not self.rows

    def step(self) -> list[tuple[int, Answer]]:
        """Admit what fits, emit one token per running sequence, retire the finished, decode the rest."""
        if self.held.store is not self.rag.store:  # the generator was handed another store: start over on it
            self._merge_prefetch()
            self.held, self._prefetched = HeldEntries(self.rag.store), set()
        finished = self._admit()
        self._prefetch_next()
        finished += self._emit()
        if self.rows:
            self._decode()
        elif not self.queue:
            self.cache = None  # idle: give the batch cache's memory back
        return finished

    def run(self, requests: list[Request], grouped: bool = True,
            on_answer: Callable[[int, Answer], None] | None = None) -> list[Answer]:
        """Answer every request; answers in the order of `requests`. `grouped`: admit requests sharing
        chunks together (else in the given order, so each is planned after the ones before it committed).
        on_answer(index, answer) as each one is done."""
        order = group_order([{c.content_hash for c in r.chunks} for r in requests], self.max_batch) \
            if grouped else range(len(requests))
        index = {self.submit(requests[i]): i for i in order}
        answers: list[Answer | None] = [None] * len(requests)
        while not self.idle:
            for ticket, answer in self.step():
                answers[index[ticket]] = answer
                if on_answer is not None:
                    on_answer(index[ticket], answer)
        return answers

    def cancel(self, ticket: int) -> bool:
        """Drop a queued or running request (its row is free for the next admission); False when
        it is not here (already answered). Call between steps."""
        for index, (queued, _) in enumerate(self.queue):
            if queued == ticket:
                del self.queue[index]
                self._lookups.pop(ticket, None)
                self._prefetched.discard(ticket)
                return True
        for row, sequence in enumerate(self.rows):
            if sequence.ticket == ticket:
                self._free(row)
                return True
        return False

    def stop(self, ticket: int) -> Answer:
        """End a running request now, as a stop token would (the caller saw its output end); its answer
        so far. Call between steps."""
        (row,) = [row for row, sequence in enumerate(self.rows) if sequence.ticket == ticket]
        return self._retire(row)[1]

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True)

    # --- admission ----------------------------------------------------------------------------

    def _admit(self) -> list[tuple[int, Answer]]:
        finished, admitted = [], False
        while self.queue and len(self.rows) < self.max_batch:
            ticket, request = self.queue[0]
            budget = self._budget(request)
            if make_mode(self._mode(request)).parallel:
                if self.rows:  # answered alone (see the module docstring): wait for the batch to drain
                    break
                self.queue.pop(0)
                self._lookups.pop(ticket, None)
                self._prefetched.discard(ticket)
                finished.append((ticket, self._answer_alone(request, budget)))
                continue
            slots = self._prompt_rows(request) + budget
            if not self._reserve(len(self.rows) + 1, slots):
                break
            self.queue.pop(0)
            sequence, prompt = self._start(ticket, request, budget)
            row, n = len(self.rows), sequence.length
            self.cache.keys[:, row, :, :n] = prompt.keys[:, 0, :, :n]
            self.cache.values[:, row, :, :n] = prompt.values[:, 0, :, :n]
            self.cache.positions[row] = -1
            self.cache.positions[row, :n] = prompt.positions[0, :n]
            self.rows.append(sequence)
            admitted = True
        if admitted:
            self.peak_rows = max(self.peak_rows, len(self.rows))
            self.held.release([self._lookups_of(ticket, request) for ticket, request in self._window()])
        return finished

    def _mode(self, request: Request) -> str:
        return request.mode or self.rag.settings.mode

    def _budget(self, request: Request) -> int:
        return self.rag.max_new_tokens if request.max_new_tokens is None else request.max_new_tokens

    def _prompt_rows(self, request: Request) -> int:
        """Prompt rows before prefill (APE requests are answered alone and never get here)."""
        return sum(len(seg.token_ids) for seg in self.rag.prompt.segments(request.question, request.chunks))

    def _reserve(self, rows: int, slots: int) -> bool:
        """Make the batch cache hold `rows` rows of `slots` slots, within max_kv_bytes unless no row runs."""
        have_rows, have_slots = (self.cache.keys.shape[1], self.cache.capacity) if self.cache is not None else (0, 0)
        slots = max(slots, have_slots)
        if self.max_kv_bytes is not None and self.rows and rows * slots * self.slot_bytes > self.max_kv_bytes:
            return False
        if rows <= have_rows and slots <= have_slots:
            return True
        grown = max(rows, min(len(self.rows) + len(self.queue), self.max_batch))  # room for what waits: one copy
        if self.max_kv_bytes is not None:
            grown = max(rows, min(grown, self.max_kv_bytes // (slots * self.slot_bytes)))
        cache = self.model.new_cache(grown, slots)
        if self.cache is not None and self.rows:
            n, width = len(self.rows), self._width()
            cache.keys[:, :n, :, :width] = self.cache.keys[:, :n, :, :width]
            cache.values[:, :n, :, :width] = self.cache.values[:, :n, :, :width]
            cache.positions[:n, :width] = self.cache.positions[:n, :width]
        self.cache = cache
        self.peak_kv_bytes = max(self.peak_kv_bytes, grown * slots * self.slot_bytes)
        return True

    def _start(self, ticket: int, request: Request, budget: int) -> tuple[_Sequence, KVCache]:
        """Prefill a request and commit its misses; returns its sequence and its prompt's cache."""
        self._lookups.pop(ticket, None)
        self._prefetched.discard(ticket)
        self._merge_prefetch()
        started = time.perf_counter()
        logits, cache, next_position, stats = self._prefill(
            request.question, request.chunks, request.mode, extra=max(budget, len(request.forced or ())) + 1,
            source=self.held)
        synchronize(self.model.device)
        ttft = time.perf_counter() - started
        stats["commit"](ttft)
        forced = self.rag.teacher_forced(cache, logits, next_position, request.forced) if request.forced else None
        sampling = self._sampling(request)
        rng = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
        stops = self.rag.prompt.stop_ids if request.stop_ids is None else request.stop_ids
        return _Sequence(ticket, request, logits, next_position, cache.length, budget, stops, stats, started, ttft,
                         sampling, rng, self.rag.store.written(), logits.cpu() if request.keep_logits else None,
                         forced), cache

    def _sampling(self, request: Request) -> Sampling:
        if request.temperature is None:
            return self.rag.sampling
        return dataclasses.replace(self.rag.sampling, temperature=request.temperature)

    def _answer_alone(self, request: Request, budget: int) -> Answer:
        self._merge_prefetch()
        return self.rag.answer(request.question, request.chunks, on_token=request.on_token, mode=request.mode,
                               keep_logits=request.keep_logits, max_new_tokens=budget,
                               sampling=self._sampling(request), stop_ids=request.stop_ids, forced=request.forced,
                               source=self.held)

    # --- prefetching --------------------------------------------------------------------------

    def _window(self) -> list[tuple[int, Request]]:
        """The queued requests the next admissions will take."""
        return self.queue[: self.max_batch]

    def _lookups_of(self, ticket: int, request: Request) -> Lookups:
        if ticket not in self._lookups:
            segments = self.rag.prompt.segments(request.question, request.chunks)
            self._lookups[ticket] = self.rag.reuse.lookups(segments, self._mode(request))
        return self._lookups[ticket]

    def _prefetch_next(self) -> None:
        """Start fetching the entries of queued requests the next admissions will need."""
        if self._prefetch is not None and not self._prefetch.done():
            return
        self._merge_prefetch()
        todo = [(ticket, request) for ticket, request in self._window() if ticket not in self._prefetched]
        wanted = [self._lookups_of(ticket, request) for ticket, request in todo]
        self._prefetched.update(ticket for ticket, _ in todo)
        if any(item.keys or item.chunk_hashes for item in wanted):
            self._prefetch = self._prefetcher.submit(self.rag.reuse.lookup_many, wanted, set(self.held.entries))

    def _merge_prefetch(self) -> None:
        if self._prefetch is not None:
            self.held.hold(self._prefetch.result())
            self._prefetch = None

    # --- decoding -----------------------------------------------------------------------------

    def _width(self) -> int:
        return max(sequence.length for sequence in self.rows)

    def _emit(self) -> list[tuple[int, Answer]]:
        """Pick each running sequence's next token; stream it; retire sequences that stopped."""
        if not self.rows:
            return []
        # each sequence at its own temperature, drawing from its own generator, as it would alone
        picks = [int(pick(s.logits[None], s.sampling, s.rng)[0]) for s in self.rows]
        for sequence, token in zip(self.rows, picks):
            if sequence.budget <= len(sequence.tokens) or token in sequence.stops:
                sequence.done = True
                continue
            sequence.tokens.append(token)
            if sequence.request.on_token is not None:
                sequence.request.on_token(self.rag.prompt.tokenizer.decode([token]))
            sequence.done = len(sequence.tokens) >= sequence.budget
        finished = []
        for row in reversed(range(len(self.rows))):
            if self.rows[row].done:
                finished.append(self._retire(row))
        return finished[::-1]

    def _retire(self, row: int) -> tuple[int, Answer]:
        sequence = self._free(row)
        self.rag.store.wait_written(sequence.written)  # its chunks are on disk before anyone hears of its answer
        total = time.perf_counter() - sequence.started
        answer = self.rag.make_answer(sequence.tokens, sequence.request.chunks, sequence.stats, sequence.ttft, total)
        answer.first_logits, answer.forced = sequence.first_logits, sequence.forced
        return sequence.ticket, answer

    def _free(self, row: int) -> _Sequence:
        """Free the row: the last row moves into it, so the running rows stay 0..n-1."""
        sequence = self.rows[row]
        last = len(self.rows) - 1
        if row != last:
            width = self.rows[last].length
            self.cache.keys[:, row, :, :width] = self.cache.keys[:, last, :, :width]
            self.cache.values[:, row, :, :width] = self.cache.values[:, last, :, :width]
            self.cache.positions[row] = self.cache.positions[last]
            self.rows[row] = self.rows[last]
        self.rows.pop()
        if self.idle:
            self.cache = None  # give the batch cache's memory back
        return sequence

    def _decode(self) -> None:
        """One batched step: every running row appends its token at its own next slot."""
        start = time.perf_counter()
        n, device = len(self.rows), self.model.device
        view = KVCache(self.cache.keys[:, :n], self.cache.values[:, :n], self.cache.positions[:n], self._width())
        tokens = torch.tensor([s.tokens[-1] for s in self.rows], device=device)
        positions = torch.tensor([s.position for s in self.rows], device=device)
        slots = torch.tensor([s.length for s in self.rows], device=device)
        with torch.inference_mode():
            logits = decode_step(self.model, tokens, positions, view, slots)
        for sequence, row_logits in zip(self.rows, logits):
            sequence.logits = row_logits
            sequence.position += 1
            sequence.length += 1
        synchronize(device)
        self.decode_s += time.perf_counter() - start
