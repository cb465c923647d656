"""Line-level reading shared by every local format: gzip, UTF-8, JSON, and what a bad line does.

Files are read one line at a time, so a corpus of any size (or a single 10 MB document)
never has to fit in memory as a whole. A bad line either stops the read with an InputError
naming file and line, or, under `--skip-bad-lines`, is left out and counted in `BadLines`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

from ragkit.errors import InputError

SKIP_HINT = "fix the line, or pass --skip-bad-lines to leave bad lines out and count them"


class BadLines:
    """What happens to a bad input line: raise (default) or skip and count (--skip-bad-lines).

    Counts are kept per part of a dataset ("corpus", "queries", "qrels"); the corpus is a
    re-iterable stream, so its count restarts with each pass instead of adding up.
    """

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def report(self, part: str, error: InputError) -> None:
        if not self.skip:
            raise error
        self.counts[part] = self.counts.get(part, 0) + 1
        self.first.setdefault(part, str(error))

    def restart(self, part: str) -> None:
        self.counts.pop(part, None)
        self.first.pop(part, None)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line for the CLI, e.g. 'skipped 2 bad lines: corpus 2 (first: corpus.jsonl:7: ...)'."""
        if not self.total:
            return "skipped 0 bad lines"
        parts = "; ".join(f"{part} {n} (first: {self.first[part]})" for part, n in self.counts.items())
        return f"skipped {self.total} bad lines: {parts}"


def find_jsonl(folder: Path, stem: str) -> Path | None:
    """`<stem>.jsonl` or `<stem>.jsonl.gz` in `folder`, whichever exists (plain first)."""
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_text_lines(path: Path, part: str, bad: BadLines) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, decoded as UTF-8 (a leading BOM is dropped)."""
    line_no = 0
    try:
        with _open_binary(path) as fh:
            for line_no, raw in enumerate(fh, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad.report(part, InputError(
                        path, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", line_no,
                        hint="re-encode the file as UTF-8, or pass --skip-bad-lines"))
                    continue
                if line_no == 1:
                    text = text.removeprefix("\ufeff")
                if text.strip():
                    yield line_no, text
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InputError(path, f"broken gzip data after line {line_no}: {exc}",
                         hint="re-download or re-compress the file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None


def iter_jsonl(path: Path, part: str, bad: BadLines) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each line of a JSON Lines file; blank lines are ignored."""
    for line_no, text in iter_text_lines(path, part, bad):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            bad.report(part, InputError(path, f"not valid JSON ({exc.msg} at column {exc.colno})", line_no,
                                        hint=SKIP_HINT))
            continue
        if not isinstance(record, dict):
            bad.report(part, InputError(path, f"expected a JSON object, got {type(record).__name__}", line_no,
                                        hint=SKIP_HINT))
            continue
        yield line_no, record


def files_fingerprint(paths: list[Path], root: Path | None = None) -> str:
    """SHA-256 over the bytes (and, under `root`, the relative names) of files, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        if root is not None:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]
