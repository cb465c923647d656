"""Document embeddings of one build, as numbered parts on disk: resumable and memory-mapped.

Layout of a store folder:
    store.json         {"format_version", "fingerprint", "dim", "dtype", "parts": [rows of part 0, ...]}
    part-00000.npy     float32 or float16 rows, in the order of the texts
store.json is the source of truth. A part is written atomically before store.json (also
rewritten atomically) lists it, so a build killed at any moment leaves the parts listed so far,
complete, plus at most one unlisted part file that the restart overwrites; the restart embeds
from the first row no listed part holds. A store whose fingerprint (texts and encoder) differs
from the build's is started over. Readers memory-map the parts, and map a part afresh for each
read: pages of a mapping count in the process's RSS while it lives, so a build that kept every
part of a 10M-row store mapped would show the whole store (7 GiB in float16) as its own memory.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ragkit.storage import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
MANIFEST = "store.json"
DTYPES = ["float32", "float16"]


def texts_fingerprint(texts: Iterable[str], encoder_fingerprint: str) -> str:
    """Identifies the embeddings of these texts, in this order, by this encoder."""
    digest = hashlib.sha256(encoder_fingerprint.encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:24]


class EmbeddingStore:
    def __init__(self, directory: str | Path, fingerprint: str, dtype: str = "float32"):
        """Open the store in `directory` for this fingerprint, or start an empty one there."""
        if dtype not in DTYPES:
            raise ValueError(f"embedding dtype must be one of {DTYPES}, got {dtype!r}")
        self.directory = Path(directory)
        self.fingerprint, self.dtype = fingerprint, dtype
        self.dim = 0
        self.part_rows: list[int] = []
        manifest = self._read_manifest()
        if manifest and manifest.get("fingerprint") == fingerprint and manifest.get("dtype") == dtype:
            self.dim, self.part_rows = manifest["dim"], list(manifest["parts"])

    @classmethod
    def open(cls, directory: str | Path) -> "EmbeddingStore":
        """The store as written, whatever its fingerprint (for readers of a finished store)."""
        manifest = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
        return cls(directory, manifest["fingerprint"], manifest["dtype"])

    def _read_manifest(self) -> dict | None:
        try:
            manifest = json.loads((self.directory / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return manifest if manifest.get("format_version") == FORMAT_VERSION else None

    @property
    def count(self) -> int:
        return sum(self.part_rows)

    def part_file(self, number: int) -> Path:
        return self.directory / f"part-{number:05d}.npy"

    def append(self, vectors: np.ndarray) -> None:
        """Write the next rows as one part, then list it."""
        vectors = np.ascontiguousarray(vectors, dtype=self.dtype)
        if self.dim and vectors.shape[1] != self.dim:
            raise ValueError(f"store holds {self.dim}-d vectors, got {vectors.shape[1]}-d")
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        atomic_write_bytes(self.part_file(len(self.part_rows)), buffer.getvalue())
        self.dim = vectors.shape[1]
        self.part_rows.append(len(vectors))
        atomic_write_json(self.directory / MANIFEST, {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                                                      "dim": self.dim, "dtype": self.dtype, "parts": self.part_rows})

    def part(self, number: int) -> np.ndarray:
        """Part `number`, memory-mapped (unmapped when the caller drops it)."""
        return np.load(self.part_file(number), mmap_mode="r")

    def parts_of(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(part number, first row in it, last row + 1 in it) covering rows [start, end)."""
        out, offset = [], 0
        for number, rows in enumerate(self.part_rows):
            lo, hi = max(start, offset), min(end, offset + rows)
            if lo < hi:
                out.append((number, lo - offset, hi - offset))
            offset += rows
        return out

    def rows(self, start: int, end: int) -> np.ndarray:
        """Rows [start, end) as one float32 array."""
        pieces = self.parts_of(start, end)
        out = np.empty((sum(b - a for _, a, b in pieces), self.dim), dtype=np.float32)
        filled = 0
        for n, a, b in pieces:
            out[filled:filled + b - a] = self.part(n)[a:b]  # float16 parts widen here, with no float16 copy
            filled += b - a
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Any rows (sorted or not) as float32, read from the parts one mapped part at a time.

        A random sample faults in (with read-around) most pages of every part it touches."""
        return take_rows(self.part, self.part_rows, rows)

    def fill(self, texts: Sequence[str], encode: Callable[[list[str]], np.ndarray], part_rows: int,
             progress: bool = False) -> int:
        """Embed the texts no listed part holds yet, `part_rows` at a time. Returns how many were embedded."""
        from tqdm.auto import tqdm

        first = self.count
        bar = tqdm(total=len(texts), initial=first, desc="embedding", unit="doc", disable=not progress,
                   dynamic_ncols=True)
        for start in range(first, len(texts), part_rows):
            batch = list(texts[start:start + part_rows])
            self.append(encode(batch))
            bar.update(len(batch))
        bar.close()
        return len(texts) - first


def take_rows(part: Callable[[int], np.ndarray], lengths: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """Rows of the concatenation of parts (`part(n)` has `lengths[n]` rows), as float32, without concatenating."""
    starts = np.cumsum([0, *lengths])
    owner = np.searchsorted(starts, rows, side="right") - 1
    out = None
    for number in np.unique(owner):
        where = np.flatnonzero(owner == number)
        block = part(number)[rows[where] - starts[number]]
        if out is None:
            out = np.empty((len(rows), block.shape[1]), dtype=np.float32)
        out[where] = block
    if out is None:  # no rows asked for
        out = np.zeros((0, part(0).shape[1] if len(lengths) else 0), dtype=np.float32)
    return out


def rows_per_part(memory_budget: int, dim: int) -> int:
    """Rows of one part: a quarter of the budget as float32 vectors (encoding needs the rest)."""
    return max(256, min(1 << 20, memory_budget // 4 // (4 * max(dim, 1))))

