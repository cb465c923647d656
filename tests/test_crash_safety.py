"""Crash safety: ragkit.storage's publish/recover protocol, and SIGKILL during `ragkit index`.

The storage tests drive the real helpers, with crashes simulated by killing a child process
at the exact step under test. The SIGKILL test kills index builds at random moments and
checks that what a fresh process then loads is either the complete old index, the complete
new one, or nothing (and then `ragkit index` rebuilds cleanly) - never a half-written folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.cli import app
from ragkit.pipeline import Pipeline
from ragkit.storage import atomic_write_bytes, atomic_write_json, publish_dir, recover_dir

ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(target: Path) -> list[str]:
    """Hidden temp/old folders that publish_dir leaves beside `target` while it works (the lock
    file `.<name>.lock` stays, empty, by design)."""
    return sorted(p.name for p in target.parent.glob(f".{target.name}.*") if p.name != f".{target.name}.lock")


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


# -- SIGKILL during `ragkit index` ---------------------------------------------------------------

FORK_TRIALS = 22
CLI_TRIALS = 2
QUESTIONS = ["vitamin bone fracture", "w3 w17 w250", "coffee liver w9", "heart statin sleep"]


def _write_corpus(root: Path, n_docs: int = 150) -> None:
    rng = random.Random(6)
    vocab = [f"w{i}" for i in range(300)] + "vitamin bone fracture heart statin sleep coffee liver".split()
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as fh:
        for i in range(n_docs):
            words = [rng.choice(vocab) for _ in range(rng.randint(30, 150))]
            text = " ".join(words[: len(words) // 2]) + ". " + " ".join(words[len(words) // 2:]) + "."
            fh.write(json.dumps({"_id": f"d{i}", "title": f"T{i}", "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as fh:
        for i, question in enumerate(QUESTIONS):
            fh.write(json.dumps({"_id": f"q{i}", "text": question}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(QUESTIONS))))


def _config(tmp_path: Path, index_name: str) -> tuple[Path, Path]:
    """(config file, its index folder); every config describes the same index."""
    folder = tmp_path / "indexes" / index_name
    path = tmp_path / f"{index_name}.toml"
    path.write_text(f"""
name = "crash"
[dataset]
format = "beir"
path = "data"
[chunking]
size = 64
overlap = 8
[retrieval]
index_dir = "{folder}"
retrievers = [{{ type = "bm25" }}]
""")
    return path, folder


def _rankings(config: Path) -> list:
    """What a fresh process loads: the hits, with scores, for every question."""
    return Pipeline.from_config(config, progress=False).retrieve_batch(QUESTIONS, k=20)


def _temp_folders(folder: Path, pid: int | str = "") -> list[Path]:
    return list(folder.parent.glob(f".{folder.name}.tmp-{pid}*"))


class IndexChecker:
    """Checks one index folder after a kill and counts what the kills left."""

    def __init__(self, config: Path, folder: Path, reference: list):
        self.config, self.folder, self.reference = config, folder, reference
        self.found = {"complete": 0, "absent, rebuilt": 0}
        self.mid_write = 0

    def check_after_kill(self, rebuild) -> None:
        if _temp_folders(self.folder):
            self.mid_write += 1  # killed between publish_dir's start and its final rename
        recover_dir(self.folder)
        assert _siblings(self.folder) == [], "a dead writer's folder is left"
        if (self.folder / "manifest.json").exists():
            # Every file's checksum is verified on load: a half-written file cannot pass.
            assert _rankings(self.config) == self.reference
            self.found["complete"] += 1
        else:
            assert not self.folder.exists(), f"partial index folder: {sorted(os.listdir(self.folder))}"
            rebuild()
            assert _rankings(self.config) == self.reference
            self.found["absent, rebuilt"] += 1


def _kill_cli_index(config: Path, folder: Path, delay: float | None, attempts: int = 5) -> subprocess.Popen:
    """Run the real `ragkit index` and SIGKILL it `delay` s after it starts writing (None: before).

    On a busy machine the poller can be starved until the run has finished; such a run was not
    killed, so it is run again (the folder then holds a complete index for the next kill to hit)."""
    for _attempt in range(attempts):
        process = subprocess.Popen([sys.executable, "-m", "ragkit.cli", "index", str(config), "--quiet"], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if delay is None:
            time.sleep(0.5)
        else:
            deadline = time.monotonic() + 180
            while not _temp_folders(folder, process.pid) and process.poll() is None:
                assert time.monotonic() < deadline, "ragkit index never started writing"
                time.sleep(0.002)
            time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.returncode == -signal.SIGKILL:
            break
    return process


def _fork_builder(pipe: Pipeline) -> int:
    """A child process that rebuilds the index in a loop until it is killed (30 builds at most)."""
    child = os.fork()
    if child == 0:
        try:
            for _ in range(30):
                pipe.index()
        finally:
            os._exit(0)
    return child


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _kill(child: int) -> None:
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)  # reaped: a zombie would still count as a live writer


def test_sigkill_during_index_never_leaves_a_half_index(tmp_path):
    """Kill index builds at random moments; every later load is complete, or absent and rebuilt."""
    _write_corpus(tmp_path / "data")
    config, folder = _config(tmp_path, "fork")
    Pipeline.from_config(config, progress=False).index()
    reference = _rankings(config)
    rng = random.Random(1234)

    # The real CLI runs in the background while the forked trials go on (its start-up takes seconds).
    cli = [_config(tmp_path, f"cli{i}") for i in range(CLI_TRIALS)]
    delays = [None] + [rng.uniform(0.0, 0.05) for _ in range(CLI_TRIALS - 1)]
    killed: list = [None] * CLI_TRIALS

    def cli_trial(i: int) -> None:
        killed[i] = _kill_cli_index(*cli[i], delays[i])

    threads = [threading.Thread(target=cli_trial, args=(i,)) for i in range(CLI_TRIALS)]
    for thread in threads:
        thread.start()

    checker = IndexChecker(config, folder, reference)
    rebuild = lambda: Pipeline.from_config(config, progress=False).index()  # noqa: E731
    # Builders are forked from this process, so each trial costs no start-up; the tokenizer is
    # loaded once (the test is about the writes). Some trials below kill the real CLI instead.
    builder = Pipeline.from_config(config, progress=False)
    tokenizer = builder._tokenizer()
    builder._tokenizer = lambda: tokenizer
    try:
        # Time one whole write on this machine now, to spread the kills over a build.
        child = _fork_builder(builder)
        _wait_for(lambda: _temp_folders(folder, child), "the first write to start")
        started = time.monotonic()
        _wait_for(lambda: not _temp_folders(folder, child), "the first write to finish")
        write_s = time.monotonic() - started
        _kill(child)
        checker.check_after_kill(rebuild)

        for trial in range(FORK_TRIALS):
            if trial % 4 == 3:
                shutil.rmtree(folder)  # this kill may hit a first build
            child = _fork_builder(builder)
            if trial % 2:
                # Aim inside the write: wait for the temp folder, then a random short delay.
                _wait_for(lambda: _temp_folders(folder, child), "a write to start")
                time.sleep(rng.uniform(0.0, write_s))
            else:
                time.sleep(rng.uniform(0.0, 2 * write_s + 0.3))
            _kill(child)
            checker.check_after_kill(rebuild)
    finally:
        for thread in threads:
            thread.join(timeout=240)

    assert sum(checker.found.values()) == FORK_TRIALS + 1
    assert checker.mid_write >= FORK_TRIALS // 4, (checker.found, checker.mid_write)

    runner = CliRunner()
    for (cli_config, cli_folder), process in zip(cli, killed):
        assert process is not None and process.returncode == -signal.SIGKILL, process and process.stderr.read()

        def rebuild_with_cli(cli_config=cli_config):
            result = runner.invoke(app, ["index", str(cli_config), "--quiet"])
            assert result.exit_code == 0, result.output

        IndexChecker(cli_config, cli_folder, reference).check_after_kill(rebuild=rebuild_with_cli)
    print(f"index kills: {checker.found}, {checker.mid_write} mid-write; CLI kills: {CLI_TRIALS}")


def test_a_reader_never_sees_the_index_swapped_halfway_through_its_load(tmp_path, monkeypatch):
    """`ragkit index` publishing while another process loads: the load gets one whole index.

    The reader pauses after checking the manifest and before reading chunks and retrievers; a
    writer then publishes an index of another corpus into the same folder. The writer has to
    wait for the reader's shared lock, so the reader loads the old index it checked.
    """
    import ragkit.pipeline as pipeline_module

    _write_corpus(tmp_path / "data", n_docs=20)
    config, folder = _config(tmp_path, "shared")
    Pipeline.from_config(config, progress=False).index()
    _write_corpus(tmp_path / "other", n_docs=30)
    other = tmp_path / "other.toml"
    other.write_text(config.read_text().replace('path = "data"', 'path = "other"'))

    tokenizer = Pipeline.from_config(config, progress=False)._tokenizer()
    monkeypatch.setattr(Pipeline, "_tokenizer", lambda self: tokenizer)  # a quick writer
    go_read, go_write = os.pipe()
    writer = os.fork()
    if writer == 0:
        try:
            os.read(go_read, 1)
            Pipeline.from_config(other, progress=False).index()
        finally:
            os._exit(0)

    verify = pipeline_module.verify_checksums
    published_during_load = []

    def verify_then_let_the_writer_go(*args):
        verify(*args)
        os.write(go_write, b"x")
        deadline = time.monotonic() + 3.0  # enough for the writer to publish, were it not blocked
        while time.monotonic() < deadline and not os.waitpid(writer, os.WNOHANG)[0]:
            time.sleep(0.01)
        published_during_load.append(time.monotonic() < deadline)

    monkeypatch.setattr(pipeline_module, "verify_checksums", verify_then_let_the_writer_go)
    reader = Pipeline.from_config(config, progress=False)
    reader.retrieve("vitamin", k=5)
    monkeypatch.setattr(pipeline_module, "verify_checksums", verify)
    if not published_during_load[0]:
        os.waitpid(writer, 0)
    assert published_during_load == [False]  # the writer waited for the reader
    assert {c.split("#")[0] for c in reader._chunks} == {f"d{i}" for i in range(20)}  # the index it checked
    fresh = Pipeline.from_config(other, progress=False)
    fresh.retrieve("vitamin", k=1)
    assert {c.split("#")[0] for c in fresh._chunks} == {f"d{i}" for i in range(30)}  # then the writer's
