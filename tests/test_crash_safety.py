"""Crash safety: ragkit.storage's publish/recover protocol, and SIGKILL during `ragkit index`.

The storage tests drive the real helpers, with crashes simulated by killing a child process
at the exact step under test. The SIGKILL test kills index builds at random moments and
checks that what a fresh process then loads is either the complete old index, the complete
new one, or nothing (and then `ragkit index` rebuilds cleanly) - never a half-written folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ragkit.storage import atomic_write_bytes, atomic_write_json, publish_dir, recover_dir

ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(target: Path) -> list[str]:
    """Hidden temp/old folders that publish_dir leaves beside `target` while it works."""
    return sorted(p.name for p in target.parent.glob(f".{target.name}.*"))


def _run_child(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run Python in a child process (no ragkit import cost beyond storage)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)


# -- ragkit.storage ----------------------------------------------------------------------------


def test_publish_dir_replaces_as_one_step(tmp_path):
    target = tmp_path / "index"
    with publish_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    assert _tree(target) == {"a.txt": b"old"}
    with publish_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
        # While the writer works, readers still see the old complete folder.
        assert _tree(target) == {"a.txt": b"old"}
    assert _tree(target) == {"a.txt": b"new", "sub/b.bin": b"\x00\x01"}
    assert _siblings(target) == []


def test_publish_dir_failure_leaves_target_untouched(tmp_path):
    target = tmp_path / "index"
    with publish_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with publish_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("writer failed")
    assert _tree(target) == {"a.txt": b"old"}
    assert _siblings(target) == []


def test_publish_dir_first_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "new-index"
    with pytest.raises(KeyboardInterrupt):
        with publish_dir(target):
            raise KeyboardInterrupt
    assert not target.exists() and _siblings(target) == []


@pytest.mark.parametrize("crash_at_rename", [1, 2])
def test_crash_between_renames_recovers(tmp_path, crash_at_rename):
    """A writer killed right before the 1st rename (target -> old) or the 2nd (tmp -> target)."""
    target = tmp_path / "index"
    with publish_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    child = _run_child(f"""
        import os, signal
        import ragkit.storage as storage
        real_replace, calls = os.replace, [0]
        def replace(src, dst):
            calls[0] += 1
            if calls[0] == {crash_at_rename}:
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        storage.os.replace = replace
        with storage.publish_dir({str(target)!r}) as tmp:
            (tmp / "a.txt").write_text("new")
    """, tmp_path)
    assert child.returncode == -signal.SIGKILL, child.stderr
    if crash_at_rename == 2:
        assert not target.exists()  # the window the protocol must recover from
    assert _siblings(target)  # the dead writer left its temp (and maybe old) folder
    recover_dir(target)
    assert _tree(target) == {"a.txt": b"old"}
    assert _siblings(target) == []


def test_crash_after_both_renames_keeps_new(tmp_path):
    """Killed after publishing but before deleting the set-aside old folder."""
    target = tmp_path / "index"
    with publish_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    child = _run_child(f"""
        import os, signal
        import ragkit.storage as storage
        storage.shutil.rmtree = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        with storage.publish_dir({str(target)!r}) as tmp:
            (tmp / "a.txt").write_text("new")
    """, tmp_path)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert any(".old-" in name for name in _siblings(target))
    recover_dir(target)
    assert _tree(target) == {"a.txt": b"new"}
    assert _siblings(target) == []


def test_recover_removes_dead_writers_temp_but_not_live_ones(tmp_path):
    target = tmp_path / "index"
    target.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".index.tmp-{dead_pid}-deadbeef"
    live = tmp_path / f".index.tmp-{os.getpid()}-cafebabe"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "part").write_text("x")
    recover_dir(target)
    assert not stale.exists()
    assert live.exists()  # a writer that is still running keeps its work
    # A new publish also clears stale temp folders first.
    stale.mkdir()
    with publish_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert not stale.exists() and _tree(target) == {"a": b"1"}


def test_recover_on_missing_parent_is_a_no_op(tmp_path):
    recover_dir(tmp_path / "nowhere" / "index")
    assert not (tmp_path / "nowhere").exists()


def test_atomic_write_killed_mid_write_keeps_old_file(tmp_path):
    path = tmp_path / "emb.json"
    atomic_write_json(path, {"v": 1})
    child = _run_child(f"""
        import os, signal, builtins
        import ragkit.storage as storage
        real_fsync = os.fsync
        def fsync(fd):
            os.kill(os.getpid(), signal.SIGKILL)  # data written to the temp file, not yet renamed
        storage.os.fsync = fsync
        storage.atomic_write_bytes({str(path)!r}, b"x" * 1_000_000)
    """, tmp_path)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert json.loads(path.read_text()) == {"v": 1}
    atomic_write_bytes(path, b"{}")
    assert path.read_bytes() == b"{}"
