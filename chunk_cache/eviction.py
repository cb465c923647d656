"""Which cache entries leave a tier when it is over its byte budget.

A policy only ranks entries; the tier evicts from the lowest rank up until the new entry fits.
`lru` ranks by last use. `value` ranks the way Cache-Craft ranks chunk variants: the recompute
time an entry saves per use, times how often it is used (a count that halves every
`HALF_LIFE_S` seconds of disuse), per byte it occupies — so a large, rarely used entry that is
cheap to recompute goes first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol

from ragkit.errors import ConfigError

HALF_LIFE_S = 3600.0
_last_tick = 0.0


def tick() -> float:
    """Wall-clock seconds, strictly increasing within the process, so LRU order has no ties."""
    global _last_tick
    _last_tick = max(time.time(), _last_tick + 1e-6)
    return _last_tick


@dataclass
class EntryStats:
    """What the policies and `stats()` know about one entry."""

    nbytes: int
    created: float
    last_used: float
    cost_s: float = 0.0  # seconds it takes to recompute the entry
    hits: int = 0
    frequency: float = 1.0  # decayed use count as of `last_used`; storing counts as the first use

    def frequency_at(self, now: float) -> float:
        return self.frequency * 0.5 ** (max(0.0, now - self.last_used) / HALF_LIFE_S)

    def record_hit(self, now: float) -> None:
        self.frequency = self.frequency_at(now) + 1.0
        self.hits += 1
        self.last_used = max(self.last_used, now)


class EvictionPolicy(Protocol):
    name: str

    def rank(self, entry: EntryStats, now: float) -> tuple[float, ...]:
        """Sort key: the entry with the smallest rank is evicted first."""
        ...


class LRUPolicy:
    name = "lru"

    def rank(self, entry: EntryStats, now: float) -> tuple[float, ...]:
        return (entry.last_used,)


class ValuePolicy:
    name = "value"

    def rank(self, entry: EntryStats, now: float) -> tuple[float, ...]:
        frequency = entry.frequency_at(now)
        return (entry.cost_s * frequency / max(entry.nbytes, 1), frequency, entry.last_used)


POLICIES = {"lru": LRUPolicy, "value": ValuePolicy}


def make_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise ConfigError("cache.eviction", f"unknown value {name!r}", allowed=sorted(POLICIES))
    return POLICIES[name]()


def choose_victims(entries: Mapping[str, EntryStats], excess_bytes: int, policy: EvictionPolicy, now: float,
                   keep: Iterable[str] = ()) -> list[str]:
    """The lowest-ranked entries (never those in `keep`) whose sizes add up to `excess_bytes`."""
    if excess_bytes <= 0:
        return []
    kept = set(keep)
    ordered = sorted((d for d in entries if d not in kept), key=lambda d: (policy.rank(entries[d], now), d))
    victims, freed = [], 0
    for digest in ordered:
        if freed >= excess_bytes:
            break
        victims.append(digest)
        freed += entries[digest].nbytes
    return victims
