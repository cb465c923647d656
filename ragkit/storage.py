"""Crash-safe file and folder writes.

A writer builds the new state under a temporary name beside the target, flushes it, and
renames it into place, so a reader sees either the old complete state or the new one.
Where readers open several files of a published folder (an index), they hold
`folder_lock(target, shared=True)` meanwhile and writers publish with `lock=True`, so that the
folder cannot be swapped between two of a reader's reads.
Components may use these helpers: they hold no ragkit state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def hash_file(path: str | Path, digest) -> str:
    """Hex digest of a file's bytes, read in 8 MiB blocks into `digest` (a hashlib or xxhash object)."""
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def folder_lock(target: str | Path, shared: bool = False) -> Iterator[None]:
    """Readers of a published folder share this lock; publishing and recovery take it alone.

    It is an flock on `.<name>.lock` beside the folder, released when its holder exits or dies.
    """
    target = Path(target)
    fd = os.open(target.with_name(f".{target.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def recover_dir(target: str | Path, lock: bool = False) -> None:
    """Finish or undo a publish that a crash interrupted.

    If the target is missing but a complete previous version was set aside, put it back.
    Left-over temporary folders of dead writers are removed. `lock`: see `publish_dir`.
    """
    target = Path(target)
    parent = target.parent
    if not parent.exists():
        return
    with folder_lock(target) if lock else contextlib.nullcontext():
        for old in sorted(parent.glob(f".{target.name}.old-*")):
            if not target.exists():
                os.replace(old, target)
            else:
                shutil.rmtree(old, ignore_errors=True)
    for tmp in parent.glob(f".{target.name}.tmp-*"):
        pid = tmp.name.split("-")[-2] if tmp.name.count("-") >= 2 else ""
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def publish_dir(target: str | Path, lock: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `target` as one step.

    On an exception the temporary folder is removed and `target` is left untouched. With `lock`,
    the swap waits for readers holding `folder_lock(target, shared=True)` (it leaves an empty
    `.<name>.lock` file beside the folder).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target, lock)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    with folder_lock(target) if lock else contextlib.nullcontext():
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
        os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
