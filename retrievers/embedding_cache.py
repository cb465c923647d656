"""On-disk cache of document embeddings, keyed by encoder fingerprint and text hash.

Layout: `<root>/<encoder fingerprint>/<shard>.npy` (float32 rows, memory-mapped when read)
and `<shard>.keys.npy` (16-byte SHA-256 prefixes of the embedded texts). A shard's keys file
is written after its vectors, so a crash leaves no half-visible shard. Re-indexing a changed
corpus embeds only the texts no shard holds yet.
"""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from ragkit.storage import atomic_write_bytes

log = logging.getLogger("ragkit.retrievers")


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class EmbeddingCache:
    def __init__(self, root: str | Path, fingerprint: str):
        self.dir = Path(root) / fingerprint
        self._shards: list[np.ndarray] = []
        self._where: dict[bytes, tuple[int, int]] = {}
        for keys_file in sorted(self.dir.glob("*.keys.npy")):
            vectors_file = keys_file.with_name(keys_file.name.replace(".keys.npy", ".npy"))
            try:
                self._open(keys_file, vectors_file)
            except (OSError, ValueError) as exc:  # a damaged shard is dropped; its texts get embedded again
                log.warning("dropping damaged embedding cache shard %s (%s)", keys_file, exc)
                keys_file.unlink(missing_ok=True)
                vectors_file.unlink(missing_ok=True)

    def _open(self, keys_file: Path, vectors_file: Path) -> None:
        keys = np.load(keys_file).tobytes()  # (n, 16) uint8
        vectors = np.load(vectors_file, mmap_mode="r")
        if len(keys) % 16 or vectors.ndim != 2 or len(vectors) != len(keys) // 16:
            raise ValueError(f"{len(keys) // 16} keys for {len(vectors)} vectors")
        shard = len(self._shards)
        self._shards.append(vectors)
        self._where.update((keys[16 * row:16 * row + 16], (shard, row)) for row in range(len(keys) // 16))

    def __len__(self) -> int:
        return len(self._where)

    def embed(self, texts: list[str], encode: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, int]:
        """Embeddings of `texts` (n, dim), computing and storing only the missing ones.

        Returns the matrix and how many texts had to be encoded.
        """
        keys = [text_key(t) for t in texts]
        missing = {}
        for key, text in zip(keys, texts):
            if key not in self._where and key not in missing:
                missing[key] = text
        if missing:
            self._store(list(missing), encode(list(missing.values())))
        locations = np.array([self._where[key] for key in keys], dtype=np.int64).reshape(-1, 2)
        dim = self._shards[0].shape[1] if self._shards else 0
        out = np.empty((len(texts), dim), dtype=np.float32)
        for shard in np.unique(locations[:, 0]):
            rows = np.flatnonzero(locations[:, 0] == shard)
            out[rows] = self._shards[shard][locations[rows, 1]]
        return out, len(missing)

    def _store(self, keys: list[bytes], vectors: np.ndarray) -> None:
        name = uuid.uuid4().hex
        atomic_write_bytes(self.dir / f"{name}.npy", _npy_bytes(np.ascontiguousarray(vectors, dtype=np.float32)))
        keys_file = self.dir / f"{name}.keys.npy"
        atomic_write_bytes(keys_file, _npy_bytes(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16)))
        self._open(keys_file, self.dir / f"{name}.npy")
