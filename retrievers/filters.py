"""Metadata filters: equality and in-set conditions on `chunk.metadata`, as slot masks.

A filter is a dict `{field: value}` (equality) or `{field: [v1, v2, ...]}` (in-set); all
fields must match. Retrievers apply the mask before top-k selection, so a filtered search
still returns k hits whenever k matching chunks exist.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from ragkit.errors import ConfigError


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


class MetadataColumns:
    """Per-field value lists aligned with retriever slots (None where a chunk lacks the field)."""

    def __init__(self, columns: dict[str, list[Any]] | None = None, size: int = 0):
        self.columns: dict[str, list[Any]] = columns or {}
        self.size = size
        self._masks: dict[str, dict[Any, np.ndarray]] = {}

    def append(self, metadata: Iterable[Mapping[str, Any]]) -> None:
        rows = list(metadata)
        for row in rows:
            for name in row:
                if name not in self.columns:
                    self.columns[name] = [None] * self.size
        for name, values in self.columns.items():
            values.extend(row.get(name) for row in rows)
        self.size += len(rows)
        self._masks.clear()

    def keep(self, keep: np.ndarray) -> None:
        """Drop the slots where `keep` is False (after deletions)."""
        slots = np.flatnonzero(keep)
        self.columns = {name: [values[i] for i in slots] for name, values in self.columns.items()}
        self.columns = {name: values for name, values in self.columns.items() if any(v is not None for v in values)}
        self.size = len(slots)
        self._masks.clear()

    def _value_masks(self, name: str) -> dict[Any, np.ndarray]:
        if name not in self._masks:
            groups: dict[Any, list[int]] = {}
            for slot, value in enumerate(self.columns[name]):
                if value is not None:
                    groups.setdefault(_hashable(value), []).append(slot)
            masks = {}
            for value, slots in groups.items():
                mask = np.zeros(self.size, dtype=bool)
                mask[slots] = True
                masks[value] = mask
            self._masks[name] = masks
        return self._masks[name]

    def mask(self, flt: Mapping[str, Any]) -> np.ndarray:
        """Boolean (n_slots,) mask of the slots matching every condition of `flt`."""
        if not isinstance(flt, Mapping):
            raise ConfigError("filter", f"expected a table of field = value, got {flt!r}")
        result = np.ones(self.size, dtype=bool)
        for name, wanted in flt.items():
            if name not in self.columns:
                raise ConfigError(f"filter.{name}", "unknown metadata field", allowed=sorted(self.columns) or None)
            masks = self._value_masks(name)
            options = wanted if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
            field_mask = np.zeros(self.size, dtype=bool)
            for option in options:
                hit = masks.get(_hashable(option))
                if hit is not None:
                    field_mask |= hit
            result &= field_mask
        return result
