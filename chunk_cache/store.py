"""Tiered, content-addressed store of per-chunk KV caches: device memory -> host memory -> disk.

An entry is addressed by (model fingerprint, dtype, context, chunk token hash), so a cache can never
hand one model's KV to another or pass rows computed behind one context off as another's
(chunk_cache.keys says what each context promises); `variants` lists a chunk's entries of every
context, in this process's tiers and in the shared disk folder. Each tier has a byte budget and
evicts by a pluggable policy (chunk_cache.eviction). Memory tiers hold an entry in one place and
move it to the first tier on a hit; disk is written through on `put`, so a warmed cache survives
the process, and disk reads are verified (fingerprint, key, xxh3) before use (chunk_cache.disk). The
store's lock guards only its memory tiers: files are read, hashed, serialised and fsynced outside it,
and with `write_behind` on a writer thread (chunk_cache.writer): `put` returns once memory holds the
entry, and `wait_written(ticket)` once it is on disk.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock

from chunk_cache.disk import ENTRIES, LOCK, MANIFEST, SUFFIX, DiskTier, clear_files, entry_files, read_manifest
from chunk_cache.dtypes import KV_DTYPES
from chunk_cache.eviction import EntryStats, EvictionPolicy, choose_victims, make_policy, tick
from chunk_cache.writer import DiskWriter
from ragkit.errors import IndexMismatchError


@dataclass(frozen=True)
class CacheKey:
    model: str  # model fingerprint (opaque here)
    dtype: str  # one of chunk_cache.dtypes.KV_DTYPES
    context_hash: str  # the context the rows were computed behind (chunk_cache.keys names each kind)
    chunk_hash: str  # token_hash(chunk token ids) == Chunk.content_hash

    def digest(self) -> str:
        """Hex sha256 of the fields; the only thing that names a file, so no key can escape its folder."""
        fields = [self.model, self.dtype, self.context_hash, self.chunk_hash]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


@dataclass
class ChunkKV:
    """One chunk's KV for every layer. Tensors handed out by the store are shared: do not modify them."""

    keys: torch.Tensor  # [L, H_kv, T, D], post-RoPE at positions start..start+T-1
    values: torch.Tensor  # [L, H_kv, T, D]
    start: int  # absolute position of the chunk's first token when encoded
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-chunk statistics (e.g. Cache-Craft)
    context: tuple[str, ...] = ()  # chunk hashes of the chunks before it when computed (Cache-Craft's S_old)

    def nbytes(self) -> int:
        tensors = [self.keys, self.values, *self.extras.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str, pin: bool = False) -> ChunkKV:
        """The same KV on `device` (self if already there); `pin` page-locks host copies for fast uploads."""
        device = torch.device(device)
        tensors = [self.keys, self.values, *self.extras.values()]
        on_device = all(t.device.type == device.type and device.index in (None, t.device.index) for t in tensors)
        if on_device and not (pin and not self.keys.is_pinned()):  # "cuda" matches tensors on "cuda:0"
            return self

        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device, non_blocking=device.type != "cpu")  # uploads may overlap; downloads must not
            return t.pin_memory() if pin and not t.is_pinned() else t

        return ChunkKV(move(self.keys), move(self.values), self.start,
                       {name: move(t) for name, t in self.extras.items()}, self.context)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, **{f"extra.{n}": t for n, t in self.extras.items()}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], start: int, context: tuple[str, ...] = ()) -> ChunkKV:
        extras = {name[len("extra."):]: t for name, t in tensors.items() if name.startswith("extra.")}
        return cls(tensors["keys"], tensors["values"], start, extras, context)


@dataclass
class Held:
    """An entry in a memory tier."""

    key: CacheKey
    kv: ChunkKV
    usage: EntryStats


class MemoryTier:
    """Entries held as tensors on one device within a byte budget."""

    def __init__(self, name: str, device: torch.device, budget: int, policy: EvictionPolicy, pin: bool = False):
        self.name, self.device, self.budget, self.policy, self.pin = name, device, budget, policy, pin
        self.entries: dict[str, Held] = {}
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def lookup(self, digest: str) -> Held | None:
        held = self.entries.get(digest)
        if held is None:
            self.misses += 1
        else:
            self.hits += 1
        return held

    def remove(self, digest: str) -> Held | None:
        held = self.entries.pop(digest, None)
        if held is not None:
            self.bytes -= held.usage.nbytes
        return held

    def insert(self, digest: str, held: Held) -> list[tuple[str, Held]]:
        """Hold an entry; returns what no longer fits (the entry itself if it exceeds the budget)."""
        self.remove(digest)
        if held.usage.nbytes > self.budget:
            return [(digest, held)]
        self.entries[digest] = Held(held.key, held.kv.to(self.device, pin=self.pin), held.usage)
        self.bytes += held.usage.nbytes
        usage = {d: h.usage for d, h in self.entries.items()}
        victims = choose_victims(usage, self.bytes - self.budget, self.policy, tick(), keep=[digest])
        self.evictions += len(victims)
        return [(d, self.remove(d)) for d in victims]

    def summary(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.bytes, "budget": self.budget, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}


class KVStore:
    """Chunk KV caches for one model, in memory tiers and (with `root`) a disk folder.

    `root=None` keeps memory tiers only. On a CPU `device` there is no device tier: host memory
    is the first tier. A `root` may hold other models' entries too; they are never returned.
    Safe to share between threads; several processes may share `root`.
    """

    def __init__(self, root: Path | None, model_fingerprint: str, *, device: str = "cpu", device_bytes: int = 0,
                 host_bytes: int = 2 << 30, disk_bytes: int = 20 << 30, eviction: str = "lru",
                 write_behind: bool = False):
        self.model = model_fingerprint
        self.device = torch.device(device)
        self.policy = make_policy(eviction)
        on_accelerator = self.device.type != "cpu"
        self._memory = [MemoryTier("host", torch.device("cpu"), host_bytes, self.policy, pin=on_accelerator)]
        if on_accelerator:
            self._memory.insert(0, MemoryTier("device", self.device, device_bytes, self.policy))
        self._disk = DiskTier(Path(root), disk_bytes, self.policy) if root is not None else None
        self._writer = DiskWriter() if write_behind and self._disk is not None else None
        self._lock = threading.RLock()
        self.hits = self.misses = 0

    def get(self, key: CacheKey, upload: bool = True) -> ChunkKV | None:
        """The entry on `device`, or None. Checks tiers in order and moves a hit to the first tier.

        upload=False: the entry where memory holds it (the device tier, or page-locked host memory), a
        host hit staying in host memory, for a caller that uploads it layer by layer while computing
        (chunk_cache.upload) and hands the device copy back through `promote`."""
        digest = self._digest(key)
        with self._lock:
            held = self._take_from_memory(digest)
        if held is None and self._writer is not None:  # spilled from memory, not on disk yet
            queued = self._writer.pending(digest)
            held = Held(key, queued.kv, queued.usage) if queued is not None else None
        if held is None:  # read and check the file without the lock; another thread may load it too
            held = self._load(key, digest, tick())
        if held is None:
            with self._lock:
                self.misses += 1
            return None
        stays_on_host = not upload and held.kv.keys.device.type == "cpu"
        if stays_on_host and self.device.type != "cpu":  # page-locked, for an asynchronous upload
            held = Held(held.key, held.kv.to("cpu", pin=True), held.usage)
        with self._lock:
            spilled = self._hold(digest, held, first=len(self._memory) - 1 if stays_on_host else 0)
            now = tick()
            held.usage.record_hit(now)
            if self._disk is not None:
                self._disk.record_hits([digest], now)
            self.hits += 1
        self._write_spilled(spilled)
        return held.kv.to(self.device) if upload else held.kv

    def _take_from_memory(self, digest: str) -> Held | None:
        """A memory tier's entry, removed from that tier so that `_hold` re-places it first (lock held)."""
        for tier in self._memory:
            held = tier.lookup(digest)
            if held is not None:
                tier.remove(digest)
                return held
        return None

    def promote(self, key: CacheKey, kv: ChunkKV) -> None:
        """Hold `kv`, the device copy a caller made of an entry that `get(key, upload=False)` returned from
        host memory, in the device tier, as a hit with upload would have; nothing without a device tier,
        when it cannot fit, or when the entry has left memory meanwhile."""
        digest = self._digest(key)
        with self._lock:
            if self.device.type == "cpu" or kv.nbytes() > self._memory[0].budget:
                return
            taken = [held for tier in self._memory if (held := tier.remove(digest)) is not None]
            if not taken:
                return
            spilled = self._hold(digest, Held(key, kv, taken[0].usage))
        self._write_spilled(spilled)

    def put(self, key: CacheKey, kv: ChunkKV, recompute_cost_s: float = 0.0) -> None:
        """Store an entry (replacing one with the same key); `recompute_cost_s` feeds the value policy."""
        digest = self._digest(key)
        if kv.keys.shape != kv.values.shape or kv.keys.dim() != 4:
            raise ValueError(f"keys {tuple(kv.keys.shape)} and values {tuple(kv.values.shape)} must both be "
                             "[layers, kv_heads, tokens, head_dim]")
        if key.dtype not in KV_DTYPES or kv.keys.dtype != getattr(torch, key.dtype):
            raise ValueError(f"key says dtype {key.dtype!r} but the tensors are {kv.keys.dtype}")
        now = tick()
        held = Held(key, kv, EntryStats(kv.nbytes(), now, now, cost_s=recompute_cost_s))
        with self._lock:
            for tier in self._memory:
                tier.remove(digest)
            spilled = self._hold(digest, held)
        if self._disk is not None:  # write-through, outside the lock
            self._write(held, make_room=True)
        self._write_spilled(spilled)

    def _write(self, held: Held, make_room: bool) -> None:
        if self._writer is None:
            self._write_now(held, make_room)
        else:
            self._writer.submit(held.key.digest(), lambda: self._write_now(held, make_room), held.usage.nbytes, held)

    def variants(self, dtype: str, chunk_hash: str) -> list[CacheKey]:
        """Keys of every stored entry of this chunk for this store's model and `dtype`, any context:
        in this process's memory tiers (first) and, through the disk folder's journal, written by any process."""
        with self._lock:
            held = sorted({held.key for tier in self._memory for held in tier.entries.values()
                           if held.key.chunk_hash == chunk_hash and held.key.dtype == dtype}, key=_context)
            on_disk = [] if self._disk is None else sorted(
                {CacheKey(k.model, k.dtype, k.context, k.chunk) for _, k in self._disk.variants(self.model, dtype,
                                                                                              chunk_hash)}
                - set(held), key=_context)
        return held + on_disk

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, CacheKey):
            return False
        digest = self._digest(key)
        with self._lock:
            if any(digest in tier.entries for tier in self._memory):
                return True
        if self._writer is not None and self._writer.pending(digest) is not None:
            return True
        return self._disk is not None and self._disk.contains(digest, self.model)

    def stats(self) -> dict:
        """Per tier: entries, bytes, budget, hits, misses, evictions; overall hit rate; per entry: size, hits, age."""
        with self._lock:
            now = tick()
            tiers = {tier.name: tier.summary() for tier in self._memory}
            entries = [_entry_row(d, tier.name, h.usage, now) for tier in self._memory for d, h in tier.entries.items()]
            if self._disk is not None:
                self._disk.refresh()
                tiers["disk"] = self._disk.summary()
                entries += [_entry_row(d, "disk", u, now) for d, u in self._disk.usage.items()]
            lookups = self.hits + self.misses
            return {"model": self.model, "root": str(self._disk.root) if self._disk else None,
                    "eviction": self.policy.name, "tiers": tiers, "hits": self.hits, "misses": self.misses,
                    "hit_rate": self.hits / lookups if lookups else 0.0, "entries": entries}

    def refresh(self) -> None:
        """See the entries other processes stored; publish queued hit counts to the disk journal."""
        if self._disk is not None:
            with self._lock:
                self._disk.refresh()

    def written(self) -> int:
        """A ticket for every disk write queued so far (0 without a writer): see `wait_written`."""
        return self._writer.last_ticket if self._writer is not None else 0

    def wait_written(self, ticket: int | None = None) -> None:
        """Return once the writes up to `ticket` (default: all) are on disk; at once without a writer."""
        if self._writer is not None:
            self._writer.wait(ticket)

    def flush(self) -> None:
        """Every queued write on disk and every queued hit count in the journal (done anyway at exit)."""
        self.wait_written()
        self.refresh()

    def clear(self) -> None:
        """Drop every entry from every tier (and the disk folder's files, keeping the folder)."""
        with self._lock:
            for tier in self._memory:
                tier.entries.clear()
                tier.bytes = 0
            if self._disk is not None:
                self._disk.clear()

    # -- internals ----------------------------------------------------------------------------
    def _digest(self, key: CacheKey) -> str:
        if key.model != self.model:
            raise ValueError(f"key for model {key.model!r} asked of the store of model {self.model!r}")
        return key.digest()

    def _hold(self, digest: str, held: Held, first: int = 0) -> list[Held]:
        """Place an entry in memory tier `first`; what overflows moves down a tier. Returns what
        overflows the last memory tier, for `_write_spilled` once the lock is released (lock held)."""
        pending = [(digest, held)]
        for tier in self._memory[first:]:
            pending = [spilled for item in pending for spilled in tier.insert(*item)]
        return [spilled for _, spilled in pending]

    def _write_spilled(self, spilled: list[Held]) -> None:
        """Entries no memory tier keeps go to disk if they are not there already and disk has room."""
        if self._disk is not None:
            for held in spilled:
                self._write(held, make_room=False)

    def _write_now(self, held: Held, make_room: bool) -> None:
        meta = {"model": held.key.model, "dtype": held.key.dtype, "prefix_hash": held.key.context_hash,  # v2 files' name
                "chunk_hash": held.key.chunk_hash, "start": str(int(held.kv.start)),
                "context": json.dumps(list(held.kv.context)), "cost_s": repr(float(held.usage.cost_s))}
        self._disk.write(held.key.digest(), held.kv.tensors(), meta, held.usage.cost_s, make_room=make_room)

    def _load(self, key: CacheKey, digest: str, now: float) -> Held | None:
        loaded = self._disk.load(digest, self.model) if self._disk is not None else None
        if loaded is None:
            return None
        tensors, meta = loaded
        kv = ChunkKV.from_tensors(tensors, int(meta["start"]), tuple(json.loads(meta.get("context", "[]"))))
        known = self._disk.usage.get(digest)
        usage = EntryStats(kv.nbytes(), known.created, now, known.cost_s, known.hits, known.frequency_at(now)) \
            if known else EntryStats(kv.nbytes(), now, now)
        return Held(key, kv, usage)


def _context(key: CacheKey) -> str:
    return key.context_hash


def _entry_row(digest: str, tier: str, usage: EntryStats, now: float) -> dict:
    return {"digest": digest, "tier": tier, "bytes": usage.nbytes, "hits": usage.hits, "cost_s": usage.cost_s,
            "age_s": round(now - usage.created, 3), "idle_s": round(now - usage.last_used, 3)}


def cache_stats(root: Path, budget: int = 20 << 30, verify: bool = False, top: int = 10) -> dict | None:
    """What a cache folder holds (None if there is none), read without knowing any model: entries,
    bytes, hits and ages overall and per model (with its dtypes), the most used entries; `verify`
    checks every entry's sha256 and drops bad ones."""
    root = Path(root)
    manifest = read_manifest(root) if root.is_dir() else None
    if manifest is None:
        return None
    disk = DiskTier(root, budget, make_policy("lru"))
    if verify:
        good = disk.verify_all()
    now = tick()
    rows = sorted((_entry_row(d, "disk", u, now) for d, u in disk.usage.items()),
                  key=lambda r: (-r["hits"], r["digest"]))
    models: dict[str, dict] = {}
    for row in rows:
        key = disk.keys.get(row["digest"])
        row["model"], row["dtype"] = (key.model, key.dtype) if key else ("?", "?")
        per = models.setdefault(row["model"], {"entries": 0, "bytes": 0, "hits": 0, "dtypes": set()})
        per["entries"] += 1
        per["bytes"] += row["bytes"]
        per["hits"] += row["hits"]
        per["dtypes"].add(row["dtype"])
    ages = [r["age_s"] for r in rows]
    info = {"dir": str(root), "models": {m: {**v, "dtypes": sorted(v["dtypes"])} for m, v in sorted(models.items())},
            "entries": len(rows), "bytes": disk.bytes, "budget": budget, "hits": sum(r["hits"] for r in rows),
            "newest_age_s": min(ages, default=None), "oldest_age_s": max(ages, default=None), "top": rows[:top]}
    if verify:
        info["verified"] = {"ok": good, "dropped": dict(disk.dropped)}
    return info


def clear_cache(root: Path) -> dict | None:
    """Delete a cache folder's entries, journal and manifest, whatever model wrote it; None if there is
    no cache there. A folder that holds something else is refused, never emptied."""
    root = Path(root)
    if not root.is_dir() or not ((root / MANIFEST).exists() or (root / ENTRIES).is_dir()):
        return None
    with FileLock(str(root / LOCK)):
        try:
            read_manifest(root)
        except IndexMismatchError:
            if not (root / ENTRIES).is_dir():
                raise
        sizes = [p.stat().st_size for p in entry_files(root) if p.name.endswith(SUFFIX)]
        clear_files(root)
    return {"dir": str(root), "entries": len(sizes), "bytes": sum(sizes)}
