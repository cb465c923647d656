"""Where the reuse path reads and writes entries: the store itself, or a batch's held view of it.

A batch of prompts (generators.engine) reads the store through `HeldEntries`: `ChunkReuse.lookup_many`
fetches every entry the batch's plans may read (`Lookups`), once, ahead of their prefills, and the
entries stay held until released, so a group's shared chunks are read once and its own stores cannot
evict them mid-group. Both sides satisfy `EntrySource`, the one interface `ChunkReuse.plan` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

from chunk_cache.store import CacheKey, ChunkKV


class EntrySource(Protocol):
    """What the reuse path reads and writes entries through: a `KVStore`, or a batch's `HeldEntries`."""

    def get(self, key: CacheKey, upload: bool = True) -> ChunkKV | None: ...

    def variants(self, dtype: str, chunk_hash: str) -> list[CacheKey]: ...

    def put(self, key: CacheKey, kv: ChunkKV, recompute_cost_s: float = 0.0) -> None: ...

    def promote(self, key: CacheKey, kv: ChunkKV) -> None: ...

    def refresh(self) -> None: ...


@dataclass(frozen=True)
class Lookups:
    """What a plan of one prompt may read: each chunk behind exactly the tokens before it (`keys`), and
    the stored variants of each chunk (`chunk_hashes`)."""

    keys: frozenset[CacheKey] = frozenset()
    chunk_hashes: frozenset[str] = frozenset()


class HeldEntries:
    """The store as a batch's prefills see it: each key is fetched once (`ChunkReuse.lookup_many`, on a
    background thread) and its entry, or its absence, held until released, so a group's shared chunks
    are read once and cannot be evicted by the group's own stores while it is being prefilled. Writes go
    through to the store. Host entries stay in host memory until a prefill uploads them layer by layer."""

    def __init__(self, store: EntrySource):
        self.store = store
        self.entries: dict[CacheKey, ChunkKV | None] = {}

    def get(self, key: CacheKey, upload: bool = True) -> ChunkKV | None:
        if key not in self.entries:
            self.entries[key] = self.store.get(key, upload=False)
        kv = self.entries[key]
        return kv.to(self.store.device) if upload and kv is not None else kv

    def variants(self, dtype: str, chunk_hash: str) -> list[CacheKey]:
        return self.store.variants(dtype, chunk_hash)

    def put(self, key: CacheKey, kv: ChunkKV, recompute_cost_s: float = 0.0) -> None:
        self.store.put(key, kv, recompute_cost_s=recompute_cost_s)
        self.entries[key] = kv

    def promote(self, key: CacheKey, kv: ChunkKV) -> None:
        """A prefill's device copy of a held host entry: the group's next prefills reuse it, the store keeps it."""
        self.store.promote(key, kv)
        if key in self.entries:
            self.entries[key] = kv

    def refresh(self) -> None:
        self.store.refresh()

    def hold(self, fetched: dict[CacheKey, ChunkKV | None]) -> None:
        for key, kv in fetched.items():
            self.entries.setdefault(key, kv)  # an entry stored meanwhile is newer than the fetched one

    def release(self, keep: Iterable[Lookups]) -> None:
        """Drop every held entry that none of `keep` may read."""
        keys = set().union(*(lookups.keys for lookups in keep))
        hashes = set().union(*(lookups.chunk_hashes for lookups in keep))
        self.entries = {key: kv for key, kv in self.entries.items() if key in keys or key.chunk_hash in hashes}
