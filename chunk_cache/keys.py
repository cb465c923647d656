"""Every key a chunk's KV is stored under, and what each promises about the rows it names.

A key is (model fingerprint, dtype, context, chunk token hash). The context says what the chunk's rows
were computed behind:

    shared    the shared prompt head alone (`ragkit cache warm`): exact when the chunk comes first
    exact     exactly the token ids now before it (hash of them): exact there, as a prefix cache is
    approx    rows behind something that was itself reused inexactly: exact nowhere

Any of them is a *variant* of the chunk and may be reused inexactly anywhere (blend, craft, naive...);
the store lists a chunk's variants across processes (`KVStore.variants`), so no per-process alias is
needed. The shared head itself is stored as a chunk encoded behind nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from chunk_cache.store import CacheKey
from ragkit.types import token_hash

APPROX = "approx:"  # context marker of rows computed behind inexactly reused rows


@dataclass(frozen=True)
class KeyScheme:
    model: str  # model fingerprint
    dtype: str  # "float32" | "bfloat16" | "float16"
    head_ids: tuple[int, ...]  # the shared prompt head every chunk is encoded behind

    def head(self) -> CacheKey:
        """The shared head's own rows."""
        return self._key(token_hash([]), self.head_ids)

    def shared(self, chunk_ids: Iterable[int]) -> CacheKey:
        """The chunk encoded behind the shared head alone."""
        return self._key(token_hash(self.head_ids), chunk_ids)

    def exact(self, before_ids: Iterable[int], chunk_ids: Iterable[int]) -> CacheKey:
        """The chunk computed behind exactly `before_ids` (the head included): exact there only."""
        return self._key(token_hash(list(before_ids)), chunk_ids)

    def approx(self, before_ids: Iterable[int], chunk_ids: Iterable[int]) -> CacheKey:
        """The chunk computed behind `before_ids` of which some rows were reused inexactly."""
        return self._key(APPROX + token_hash(list(before_ids)), chunk_ids)

    def _key(self, context: str, chunk_ids: Iterable[int]) -> CacheKey:
        return CacheKey(self.model, self.dtype, context, token_hash(list(chunk_ids)))
