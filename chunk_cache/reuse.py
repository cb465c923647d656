"""The reuse path of one decoder, top to bottom: plan -> assemble -> recompute -> commit.

    plan       per chunk of the prompt, the entry to reuse: an exact one (computed behind exactly
               the tokens now before it), else the variant whose stored context overlaps most with
               the present one (chunk_cache.craft's beta'), else none: the chunk is computed here
    assemble   the prompt's rows, positions and cache, reused keys rotated to their new positions; entries
               in host memory are copied in layer by layer while the layers compute (chunk_cache.upload)
    recompute  the rows the mode selects (chunk_cache.modes; a query-aware mode first runs the question
               alone over the reused rows, chunk_cache.probe), layer by layer, each attending with
               the exact causal mask; Cache-Craft statistics of the chunks computed here
    commit     store what was computed, so that a miss costs one computation in any process: behind
               an exact prefix under that prefix's key, else under an `approx` key (chunk_cache.keys);
               the store's device tier keeps the device copies of the entries uploaded here

`ChunkReuse.prefill` runs the first three; the generator decodes from the cache it returns, then commits.
A batch of prompts reads the store through `chunk_cache.entries.HeldEntries`: `lookup_many` fetches every
entry their plans may read, once, ahead of their prefills. `ChunkReuse.last_logits` scores many prompts
that only reuse exact leading rows in batched forwards (chunk_cache.batch): a pointwise reranker's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from chunk_cache.assembly import CHUNK, HEAD, Layout, Segment, assemble
from chunk_cache.batch import BatchPrompt, BatchRoom, batchable, last_logits, sub_batches
from chunk_cache.craft import ChunkStatistics, attention_probs, overlap, stat_layers
from chunk_cache.decoder import ReuseDecoder
from chunk_cache.entries import EntrySource, Lookups
from chunk_cache.keys import KeyScheme
from chunk_cache.modes import ANY, NONE, Candidates, Deviation, Mode, ReusedChunk, ReuseSettings, make_mode
from chunk_cache.probe import question_attention
from chunk_cache.store import CacheKey, ChunkKV, KVStore

MAX_VARIANTS = 4  # stored variants of one chunk compared per lookup (each may cost a disk read)


@dataclass
class Miss:
    """A chunk computed in this prompt, to be stored under `key` by commit."""

    index: int  # segment index
    key: CacheKey
    context: tuple[str, ...]  # chunk hashes before it


@dataclass
class Plan:
    segments: list[Segment]
    mode: Mode
    settings: ReuseSettings
    entries: dict[int, ChunkKV] = field(default_factory=dict)  # segment index -> stored KV reused
    keys: dict[int, CacheKey] = field(default_factory=dict)  # segment index -> the key its entry was found under
    exact: set[int] = field(default_factory=set)  # indices whose entry is exact where it now sits
    overlap: dict[int, float] = field(default_factory=dict)  # inexact index -> beta' of its variant
    misses: list[Miss] = field(default_factory=list)
    statistics: bool = False  # collect Cache-Craft statistics of the misses (modes that read them; warming)


@dataclass
class Prefilled:
    logits: torch.Tensor  # [V] fp32, next-token logits after the last prompt row
    chunk_rows: int  # chunk rows in the prompt
    recomputed: int  # chunk rows that ran through the last layer (computed or recomputed)
    recompute_share: float  # chunk rows computed, summed over every layer, / (layers x chunk rows)
    statistics: dict[int, dict[str, torch.Tensor]]  # miss segment index -> Cache-Craft extras
    probe_s: float = 0.0  # seconds of a query-aware mode's first pass (part of the prefill)


class ChunkReuse:
    """The reuse path behind one object; the store and key scheme decide where entries live."""

    def __init__(self, model: ReuseDecoder, store: KVStore, keys: KeyScheme):
        self.model, self.store, self.keys = model, store, keys
        self._head: ChunkKV | None = None
        self._room = BatchRoom()  # last_logits' batch KV memory, reused

    # --- plan -----------------------------------------------------------------------------
    def exact_keys(self, segments: list[Segment]) -> dict[int, CacheKey]:
        """Per chunk segment, its key behind exactly the tokens now before it (the one walk over a prompt)."""
        keys, before = {}, list(segments[0].token_ids)
        for index, seg in enumerate(segments[1:], start=1):
            if seg.kind == CHUNK:
                keys[index] = self.keys.exact(before, seg.token_ids)
            before.extend(seg.token_ids)
        return keys

    def lookups(self, segments: list[Segment], mode: str) -> Lookups:
        """What `plan(segments, mode)` may read from the store."""
        lookup = make_mode(mode).lookup
        if lookup == NONE:
            return Lookups()
        keys = frozenset(self.exact_keys(segments).values())
        return Lookups(keys, frozenset(k.chunk_hash for k in keys) if lookup == ANY else frozenset())

    def lookup_many(self, lookups: Iterable[Lookups], skip: Iterable[CacheKey] = ()) -> dict[CacheKey, ChunkKV | None]:
        """Fetch, as the store holds them (host entries stay on the host), every entry plans with these
        `lookups` may read, but those in `skip`: for a prefetch thread (the store is thread safe)."""
        keys, hashes = set(), set()
        for item in lookups:
            keys |= item.keys
            hashes |= item.chunk_hashes
        keys |= {key for h in hashes for key in self.store.variants(self.keys.dtype, h)[:MAX_VARIANTS]}
        return {key: self.store.get(key, upload=False) for key in keys - set(skip)}

    def plan(self, segments: list[Segment], settings: ReuseSettings, source: EntrySource | None = None) -> Plan:
        """`source`: where entries are read (default: the store; a batch passes its `HeldEntries`)."""
        mode = make_mode(settings.mode)
        plan = Plan(segments, mode, settings)
        if mode.lookup == NONE:
            return plan
        source = self.store if source is None else source
        source.refresh()  # see the entries other processes stored since the last prompt
        plan.entries[0], plan.keys[0], plan.exact = self.head(), self.keys.head(), {0}
        exact_keys = self.exact_keys(segments)
        before: list[int] = list(segments[0].token_ids)
        chunks_before: list[str] = []
        leading = not mode.parallel  # every row so far is what full prefill computes
        for index, seg in enumerate(segments[1:], start=1):
            if seg.kind == CHUNK:
                exact_key = exact_keys[index]
                kv = source.get(exact_key, upload=False) if leading else None
                if kv is not None:
                    plan.entries[index], plan.keys[index] = kv, exact_key
                    plan.exact.add(index)
                else:
                    now_before = [] if mode.parallel else chunks_before  # APE's chunks do not see each other
                    found = self._best_variant(source, seg, now_before, mode) if mode.lookup == ANY else None
                    if found is None and mode.parallel:  # APE cannot compute a chunk in place
                        found = self.keys.shared(seg.token_ids), self.encode(seg.token_ids), 1.0
                    if found is None:
                        key = exact_key if leading else self.keys.approx(before, seg.token_ids)
                        plan.misses.append(Miss(index, key, tuple(chunks_before)))
                    else:
                        plan.keys[index], plan.entries[index], plan.overlap[index] = found
                        leading = False
                chunks_before.append(exact_key.chunk_hash)
            before.extend(seg.token_ids)
        if len(plan.entries) == 1 and not mode.parallel and getattr(self.model, "rope_switch", None) is None:
            # Nothing but the head found: compute it too, so the prompt is one causal prefill (the kernel full
            # prefill gets) and a cold prompt costs no more than full prefill; the misses are stored as planned.
            # (Under LongRoPE the head stays an entry: assembly then refuses prompts past the factor switch,
            # whose computed rows must not be stored.)
            plan.entries, plan.keys, plan.exact = {}, {}, set()
        plan.statistics = mode.needs_statistics
        return plan

    def _best_variant(self, source: EntrySource, seg: Segment, chunks_before: list[str],
                      mode: Mode) -> tuple[CacheKey, ChunkKV, float] | None:
        """The stored variant of the chunk needing least recomputation here: highest beta' (Cache-Craft),
        and for modes that read statistics, one that carries them; at equal beta', one computed behind passages
        if the chunk now sits behind passages (a primed variant, chunk_cache.primer), else one computed behind
        none."""
        best, best_rank = None, None
        for key in source.variants(self.keys.dtype, self.keys.shared(seg.token_ids).chunk_hash)[:MAX_VARIANTS]:
            kv = source.get(key, upload=False)
            if kv is None:
                continue
            beta = overlap(kv.context, kv.extras.get("inter_by_chunk"), chunks_before)
            rank = (not mode.needs_statistics or "cci" in kv.extras, beta, bool(kv.context) == bool(chunks_before))
            if best_rank is None or rank > best_rank:
                best, best_rank = (key, kv, beta), rank
        return best

    def head(self) -> ChunkKV:
        """The shared head's KV, stored like a chunk encoded behind nothing."""
        if self._head is None:
            key = self.keys.head()
            kv = self.store.get(key)
            if kv is None:
                n = len(self.keys.head_ids)
                cache = self.model.new_cache(1, n)
                positions = torch.arange(n, device=self.model.device)
                self.model.forward(torch.tensor([self.keys.head_ids], device=self.model.device), positions[None],
                                   cache, positions)
                kv = ChunkKV(cache.keys[:, 0].clone(), cache.values[:, 0].clone(), start=0)
                self.store.put(key, kv)
            self._head = kv
        return self._head

    # --- assemble -------------------------------------------------------------------------
    def assemble(self, plan: Plan, extra: int):
        """(Layout, cache with `extra` free rows); APE's temperature and scale ride on the cache. Reused rows
        of layer i are in place once `cache.ready(i)` returns."""
        return assemble(self.model, plan.segments, plan.entries, plan.exact, extra, parallel=plan.mode.parallel)

    # --- recompute ------------------------------------------------------------------------
    def recompute(self, plan: Plan, layout: Layout, cache) -> Prefilled:
        chunk_rows = _rows_of(layout, plan.segments, CHUNK)
        statistics = {m.index: self._statistics(layout, plan, m.index) for m in plan.misses} if plan.statistics else {}
        timing = {"probe_s": 0.0}
        if plan.mode.parallel:
            logits = self._parallel(layout, cache, plan.settings)
            layer_rows = [~layout.reused] * self.model.args.n_layers
        else:
            if plan.mode.layerwise is None:
                rows = ~layout.reused | plan.mode.static(self._candidates(layout, plan, cache, timing), plan.settings)
                checks = []
            else:  # every row not known to be exact runs until the first check layer
                rows, checks = ~layout.exact, plan.mode.layerwise.checks(plan.settings)
            logits, layer_rows = self._run(layout, cache, rows, checks, plan, statistics)
        cache.ready(self.model.args.n_layers - 1)  # every layer in place for decoding, commit and batching
        cache.uploads = None
        computed = sum(int((r & chunk_rows).sum()) for r in layer_rows)
        n_chunk_rows = int(chunk_rows.sum())
        return Prefilled(logits, n_chunk_rows, int((layer_rows[-1] & chunk_rows).sum()),
                         computed / max(1, n_chunk_rows * len(layer_rows)),
                         {i: s.extras() for i, s in statistics.items()}, timing["probe_s"])

    def _candidates(self, layout: Layout, plan: Plan, cache, timing: dict[str, float]) -> Candidates:
        """The reused, inexact chunks, and (lazily, timed into `timing`) the question's first pass over them."""
        reused = [ReusedChunk(*layout.spans[i], plan.entries[i].extras, plan.overlap.get(i, 0.0))
                  for i in sorted(plan.entries) if i not in plan.exact and plan.segments[i].kind == CHUNK]

        def first_pass() -> torch.Tensor:
            start = time.perf_counter()
            question = torch.arange(int(layout.reused.nonzero().max()) + 1, layout.size)  # rows after the last reused
            inexact = torch.zeros(layout.size, dtype=torch.bool)
            for chunk in reused:
                inexact[chunk.start: chunk.end] = True
            score = question_attention(self.model, layout.token_ids[question], layout.positions[question], question,
                                       cache, inexact)
            timing["probe_s"] = time.perf_counter() - start
            return score

        return Candidates(layout.size, reused, first_pass)

    def _statistics(self, layout: Layout, plan: Plan, index: int) -> ChunkStatistics:
        """Cache-Craft statistics of chunk `index`: attention to the head (sink excluded) and earlier chunks."""
        head = layout.spans[0]
        groups = [(head[0] + 1, head[1])] + [layout.spans[i] for i in range(1, index)
                                             if plan.segments[i].kind == CHUNK]
        return ChunkStatistics(layout.spans[index], groups)

    def _run(self, layout: Layout, cache, rows: torch.Tensor, checks: list[tuple[int, float]], plan: Plan,
             statistics: dict[int, ChunkStatistics]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Compute `rows` layer by layer; at each check layer keep the best-scoring share of the reused,
        inexact rows (computed rows always stay). Returns last-row logits and the rows of every layer."""
        model, device = self.model, self.model.device
        idx = rows.nonzero()[:, 0]
        slots = idx.to(device)
        positions = layout.positions[idx][None].to(device)
        cache.positions[0, slots] = positions[0]
        x = model.embed_tokens(layout.token_ids[idx][None].to(device))
        rope = model.rope(positions)
        masks = model.masks_for(cache, positions, slots)
        candidates = layout.reused & ~layout.exact  # what a check may drop
        sampled = set(stat_layers(model.args.n_layers)) if statistics else set()
        layer_rows, pending = [], dict(checks)
        for i in range(model.args.n_layers):
            cache.ready(i)  # before _select reads layer i's stored rows and the fresh rows overwrite them
            q, k, v = model.qkv(i, x, rope)
            keep = None
            if i in pending:
                keep = self._select(i, idx, q, k, v, slots, positions, cache, candidates, pending[i],
                                    plan.mode.layerwise.score)
            cache.keys[i, :, :, slots] = k
            cache.values[i, :, :, slots] = v
            if i in sampled:
                for index, stats in statistics.items():
                    s, e = layout.spans[index]
                    where = torch.searchsorted(idx, torch.arange(s, e)).to(device)
                    stats.add(attention_probs(q[:, :, where], cache.keys[i, :, :, : e], cache.positions[0, :e],
                                              positions[0, where], model.softmax_scale))
            if keep is not None:
                sel = keep.nonzero()[:, 0].to(device)
                idx, x, q, slots, positions = idx[keep], x[:, sel], q[:, :, sel], slots[sel], positions[:, sel]
                rope = (rope[0][:, :, sel], rope[1][:, :, sel])
                masks = model.masks_for(cache, positions, slots)
            current = torch.zeros(layout.size, dtype=torch.bool)
            current[idx] = True
            layer_rows.append(current)
            x = model.finish(i, x, q, cache, positions, masks)
        return model.logits(x[:, -1:])[0, -1], layer_rows

    def _select(self, layer: int, idx, q, k, v, slots, positions, cache, candidates: torch.Tensor, share: float,
                score) -> torch.Tensor:
        """Which of the running rows `idx` keep running after check `layer`: every computed row, and the
        top `share` of all reused, inexact rows of the prompt by the mode's score."""
        running = candidates[idx]
        keep = ~running
        n_pick = min(int(running.sum()), math.ceil(share * int(candidates.sum())))
        if n_pick:
            stored_k = cache.keys[layer, :, :, slots].float()  # [1, H_kv, S, D], before fresh rows overwrite them
            stored_v = cache.values[layer, :, :, slots].float()
            tail = idx > int(idx[running].max())  # rows after the last reused one: the question

            def attention_read() -> torch.Tensor:
                cache.keys[layer, :, :, slots] = k  # the question reads fresh rows, as it will
                read = _attention_received(self.model, layer, q[:, :, tail.to(q.device)],
                                           positions[:, tail.to(q.device)], cache)
                return read[slots].cpu()

            deviation = Deviation((k.float() - stored_k).pow(2).sum(dim=(0, 1, 3)).cpu(),
                                  (v.float() - stored_v).pow(2).sum(dim=(0, 1, 3)).cpu(), attention_read)
            scores = score(deviation)
            scores[~running] = -1.0
            keep[scores.topk(n_pick).indices] = True
        return keep

    def _parallel(self, layout: Layout, cache, settings: ReuseSettings) -> torch.Tensor:
        """APE: each group's computed rows (title, separator) attend to the head and their own group
        only; then the question attends to every group at temperature T, rescaled by S."""
        model, device = self.model, self.model.device
        computed = ~layout.reused
        for group in layout.group[computed].unique().tolist():
            if group < 0:
                continue
            rows = computed & (layout.group == group)
            hidden = (layout.group >= 0) & (layout.group != group)
            saved = cache.positions[0, : layout.size].clone()
            cache.positions[0, : layout.size][hidden.to(device)] = -1  # other groups are invisible to it
            idx = rows.nonzero()[:, 0]
            model.forward(layout.token_ids[idx][None].to(device), layout.positions[idx][None].to(device), cache,
                          idx.to(device))
            saved[idx.to(device)] = cache.positions[0, idx.to(device)]
            cache.positions[0, : layout.size] = saved
        cache.ape = (settings.ape_temperature, settings.ape_scale)
        idx = (computed & (layout.group < 0)).nonzero()[:, 0]
        return model.forward(layout.token_ids[idx][None].to(device), layout.positions[idx][None].to(device), cache,
                             idx.to(device))[0, -1]

    # --- commit ---------------------------------------------------------------------------
    def commit(self, plan: Plan, layout: Layout, cache, prefilled: Prefilled, prefill_s: float,
               source: EntrySource | None = None) -> None:
        """Store each chunk computed in this prompt, with its statistics and the chunks before it; hand
        the device copies of entries uploaded from host memory to the store's device tier (a hit moves
        an entry to the first tier; the upload already made the copy). The store writes entries to disk
        off the caller's thread when it has a writer (chunk_cache.writer)."""
        source = self.store if source is None else source
        for index, kv in layout.uploaded.items():
            source.promote(plan.keys[index], kv)
        for miss in plan.misses:
            s, e = layout.spans[miss.index]
            kv = ChunkKV(cache.keys[:, 0, :, s:e].clone(), cache.values[:, 0, :, s:e].clone(),
                         start=int(layout.positions[s]), extras=prefilled.statistics.get(miss.index, {}),
                         context=miss.context)
            source.put(miss.key, kv, recompute_cost_s=prefill_s * (e - s) / max(1, layout.size))

    # --- the steps in order ------------------------------------------------------------------
    def prefill(self, segments: list[Segment], settings: ReuseSettings, extra: int,
                source: EntrySource | None = None):
        """Plan, assemble and recompute a prompt; returns (plan, Prefilled, layout, cache). The caller
        commits once the first token is out, so storing the misses never delays it."""
        plan = self.plan(segments, settings, source)
        layout, cache = self.assemble(plan, extra)
        return plan, self.recompute(plan, layout, cache), layout, cache

    def last_logits(self, prompts: list[list[Segment]], settings: ReuseSettings,
                    batch_size: int) -> tuple[list[torch.Tensor], list[int]]:
        """Each prompt's next-token logits [V] and the rows computed for it. A prompt whose plan reuses an
        exact leading run of segments (or nothing) and stores nothing is computed with up to `batch_size`
        such prompts of similar length in one forward (chunk_cache.batch); any other is prefilled alone at
        once and its misses committed, so a later prompt with the same chunk finds it."""
        logits: list[torch.Tensor | None] = [None] * len(prompts)
        rows = [0] * len(prompts)
        batched: list[tuple[int, BatchPrompt]] = []
        for index, segments in enumerate(prompts):
            plan = self.plan(segments, settings)
            prompt = batchable(plan, getattr(self.model, "rope_switch", None))
            if prompt is None:
                start = time.perf_counter()
                layout, cache = self.assemble(plan, 1)
                prefilled = self.recompute(plan, layout, cache)
                self.commit(plan, layout, cache, prefilled, time.perf_counter() - start)
                logits[index], rows[index] = prefilled.logits, int((~layout.reused).sum())
            else:
                batched.append((index, prompt))
                rows[index] = len(prompt.computed)
        for group in sub_batches([p for _, p in batched], batch_size):
            part = [batched[g] for g in group]
            for (index, _), row in zip(part, last_logits(self.model, [p for _, p in part], self._room)):
                logits[index] = row
        return logits, rows

    def encode_behind(self, segments: list[Segment]) -> None:
        """Compute `segments` reusing exact entries only and store every chunk computed, with its statistics,
        under its exact key: the last chunk computed behind the passages before it (chunk_cache.primer)."""
        plan = self.plan(segments, ReuseSettings(mode="prefix"))
        plan.statistics = True
        layout, cache = self.assemble(plan, 0)
        start = time.perf_counter()
        prefilled = self.recompute(plan, layout, cache)
        self.commit(plan, layout, cache, prefilled, time.perf_counter() - start)

    def encode(self, chunk_ids: Iterable[int]) -> ChunkKV:
        """The chunk computed behind the shared head alone, stored under its shared key (a warm)."""
        segments = [Segment(HEAD, self.keys.head_ids), Segment(CHUNK, tuple(chunk_ids))]
        plan = Plan(segments, make_mode("naive"), ReuseSettings(mode="naive"), entries={0: self.head()},
                    keys={0: self.keys.head()}, exact={0}, misses=[Miss(1, self.keys.shared(chunk_ids), ())],
                    statistics=True)
        layout, cache = self.assemble(plan, 0)
        start = time.perf_counter()
        prefilled = self.recompute(plan, layout, cache)
        self.commit(plan, layout, cache, prefilled, time.perf_counter() - start)
        s, e = layout.spans[1]
        return ChunkKV(cache.keys[:, 0, :, s:e], cache.values[:, 0, :, s:e], start=s,
                       extras=prefilled.statistics[1])


def _rows_of(layout: Layout, segments: list[Segment], kind: str) -> torch.Tensor:
    rows = torch.zeros(layout.size, dtype=torch.bool)
    for seg, (s, e) in zip(segments, layout.spans):
        if seg.kind == kind:
            rows[s:e] = True
    return rows


def _attention_received(model, layer: int, q: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """Causal attention weight each cache slot gets from queries q [1, H, S, D] at `positions` [1, S],
    summed over heads and queries; returns [T] fp32 (T = cache.length)."""
    keys = cache.keys[layer, 0, :, : cache.length]  # [H_kv, T, D]
    keys = keys.repeat_interleave(q.shape[1] // keys.shape[0], dim=0).float()  # [H, T, D]
    scores = (q[0].float() @ keys.transpose(1, 2)) * model.softmax_scale  # [H, S, T]
    key_positions = cache.positions[0, : cache.length]
    hidden = (key_positions < 0)[None, :] | (key_positions[None, :] > positions[0][:, None])  # [S, T]
    return scores.masked_fill(hidden[None], float("-inf")).softmax(-1).sum(dim=(0, 1))
