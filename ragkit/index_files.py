"""The files of a published index folder beside the retrievers': `chunks.jsonl` (one chunk record a line)
and the sha256 of every file, which the manifest lists and every load checks (ragkit.pipeline)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from ragkit.errors import IndexMismatchError
from ragkit.storage import hash_file
from ragkit.types import Chunk


def write_chunks(path: Path, chunks: list[Chunk]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for c in chunks:
            fh.write(json.dumps({"id": c.id, "doc_id": c.doc_id, "text": c.text, "title": c.title,
                                 "token_ids": list(c.token_ids), "span": list(c.span), "hash": c.content_hash,
                                 "metadata": dict(c.metadata)}, ensure_ascii=False) + "\n")


def file_checksums(folder: Path, manifest: str) -> dict[str, str]:
    """sha256 of every file under `folder` (the `manifest` file itself excepted), by relative path."""
    return {path.relative_to(folder).as_posix(): _sha256(path)
            for path in sorted(folder.rglob("*")) if path.is_file() and path != folder / manifest}


def _sha256(path: Path) -> str:
    return hash_file(path, hashlib.sha256())


def verify_checksums(folder: Path, manifest: str, files: Any, rebuild: str) -> None:
    """A file changed, truncated or removed since `ragkit index` wrote it is never read."""
    if not isinstance(files, dict) or not files:
        raise IndexMismatchError(f"{folder / manifest}: no file checksums in the index manifest; {rebuild}")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise IndexMismatchError(f"{path}: missing from the index; {rebuild}")
        if _sha256(path) != expected:
            raise IndexMismatchError(f"{path}: checksum mismatch, the file changed after `ragkit index` "
                                     f"wrote it; {rebuild}")


def read_chunks(path: Path) -> Iterator[Chunk]:
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                try:
                    r = json.loads(line)
                    yield Chunk(r["id"], r["doc_id"], r["text"], tuple(r["token_ids"]), tuple(r["span"]),
                                r["hash"], r.get("title", ""), r.get("metadata", {}))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise IndexMismatchError(f"{path}:{line_no}: damaged chunk record ({exc}); "
                                             "rebuild with `ragkit index`") from None
    except FileNotFoundError:
        raise IndexMismatchError(f"{path}: missing; rebuild with `ragkit index`") from None
