"""`ragkit cache warm/stats/clear` end to end, and SIGKILL of `ragkit cache warm` at random moments.

A tiny random Llama with SmolLM2's tokenizer stands in for the generator, so a warm of a few dozen
chunks takes about a second and 20 killed runs fit in a test; the store does not care what the
tensors mean.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from chunk_cache.disk import DiskTier, read_entry
from chunk_cache.eviction import LRUPolicy
from chunk_cache.store import CacheKey, ChunkKV, KVStore, clear_cache
from ragkit.cli import app
from tests.conftest import tiny_llama
from tests.test_pipeline import make_beir, make_config

pytestmark = pytest.mark.slow
runner = CliRunner()
torch.set_num_threads(1)  # no OpenMP thread pool in this process, so forked children cannot inherit a broken one
DOCS = [(f"d{i}", f"Topic {i}", f"Document {i} says that item {i} relates to item {i * 7 % 40} in study {i % 5}.")
        for i in range(40)]
QUERIES = [("q1", "item 3 relates"), ("q2", "study 4 item 9"), ("q3", "topic 12 document")]
QRELS = [("q1", "d3", 1), ("q2", "d9", 1), ("q3", "d12", 1)]
TRIALS = 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A config over 40 one-chunk documents, a tiny random Llama, and its cache folder (one entry per chunk:
    no primed entries, whose count would hang on which chunk primes)."""
    folder = tmp_path_factory.mktemp("warm")
    tiny_llama(folder / "model")
    make_beir(folder / "data", docs=DOCS, queries=QUERIES, qrels=QRELS)
    cfg = make_config(folder, extra=f'[generator]\nmodel = "{folder / "model"}"\ndevice = "cpu"\n'
                                    f'[cache]\ndir = "{folder / "kv"}"\nprimer_passages = 0\n')
    assert runner.invoke(app, ["index", str(cfg), "-q"]).exit_code == 0
    return cfg, folder / "kv"


def warm(cfg: Path, *extra: str):
    return runner.invoke(app, ["cache", "warm", str(cfg), "-q", *extra])


def stats(cfg: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["cache", "stats", str(cfg), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def entry_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def test_warm_stats_repair_mismatch_and_clear(tiny):
    cfg, root = tiny
    clear_cache(root)
    result = warm(cfg, "--top", "3")  # the 3 chunks retrieved most often for the config's queries
    assert result.exit_code == 0 and result.stdout.startswith("warmed 3 chunks")
    assert stats(cfg)["entries"] == 3 + 1
    assert warm(cfg).stdout.startswith(f"warmed {len(DOCS) - 3} chunks")
    info = stats(cfg)
    assert info["entries"] == len(DOCS) + 1  # every chunk and the shared prefix
    assert warm(cfg).stdout.startswith("warmed 0 chunks")
    assert "entries 41" in runner.invoke(app, ["cache", "stats", str(cfg)]).stdout

    # A tampered chunk entry and one written by another model are both found and recomputed. Digests
    # depend on the model's folder, so the shared prefix (the one entry stored at start 0) can sort
    # anywhere: leave it out, or its repair would not count as a warmed chunk.
    files = [path for path in entry_files(root) if read_entry(path)[1]["start"] != "0"]
    assert len(files) == len(DOCS)
    data = bytearray(files[3].read_bytes())
    data[-100] ^= 0xFF
    files[3].write_bytes(bytes(data))
    digest = files[7].name.removesuffix(".safetensors")
    foreign = DiskTier(root.parent / "foreign", 1 << 30, LRUPolicy())
    foreign.write(digest, {"keys": torch.zeros(2, 2, 3, 8), "values": torch.zeros(2, 2, 3, 8)},
                  {"start": "0", "model": "another-model", "dtype": "float32", "prefix_hash": "p", "chunk_hash": "c"},
                  0.0)
    os.replace(foreign.path(digest), files[7])
    assert warm(cfg).stdout.startswith("warmed 2 chunks")
    verified = stats(cfg, "--verify")["verified"]
    assert verified == {"ok": len(DOCS) + 1, "dropped": {}}

    # Another model's entries share the folder: nothing is refused, stats lists both, clear removes all.
    KVStore(root, "another-model").put(CacheKey("another-model", "float32", "p", "c"),
                                       ChunkKV(torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8), 0))
    assert warm(cfg).stdout.startswith("warmed 0 chunks")
    models = stats(cfg)["models"]
    assert sorted(v["entries"] for v in models.values()) == [1, len(DOCS) + 1] and "another-model" in models
    cleared = runner.invoke(app, ["cache", "clear", str(cfg)])
    assert cleared.exit_code == 0 and f"removed {len(DOCS) + 2} entries" in cleared.stdout
    assert not entry_files(root)
    assert warm(cfg).stdout.startswith(f"warmed {len(DOCS)} chunks")


def test_a_primed_warm_stores_each_chunk_twice_and_the_primer_once(tiny):
    """With `cache.primer_passages` 1 (the default) every chunk but the primer is also stored behind the primer;
    entries: the head, each chunk's shared one, each primed one and the primer's own behind its title."""
    from chunk_cache.primer import choose_primers
    from ragkit.pipeline import Pipeline

    cfg, root = tiny
    primed = cfg.with_name("primed.toml")
    primed.write_text(cfg.read_text().replace("primer_passages = 0", f'primer_passages = 1\ndir = "{root}-primed"'
                                              ).replace(f'dir = "{root}"\n', ""))
    assert Pipeline.from_config(cfg).primers() == []
    pipe = Pipeline.from_config(primed)
    assert pipe.primers() == choose_primers(pipe._chunks.values(), 1) and len(pipe.primers()) == 1
    result = warm(primed)
    assert result.exit_code == 0 and result.stdout.startswith(f"warmed {len(DOCS)} chunks"), result.output
    assert stats(primed)["entries"] == 1 + len(DOCS) + (len(DOCS) - 1) + 1
    assert warm(primed).stdout.startswith("warmed 0 chunks")


def run_cli_warm(cfg: str) -> None:
    """A forked child: exactly what `ragkit cache warm CONFIG -q` runs."""
    app(["cache", "warm", cfg, "-q"], standalone_mode=False)


def test_sigkill_during_cache_warm_leaves_only_complete_entries(tiny, tmp_path):
    cfg, root = tiny
    ctx = multiprocessing.get_context("fork")  # no torch import per run: 20 runs stay cheap

    def run(kill_after: float | None) -> None:
        child = ctx.Process(target=run_cli_warm, args=(str(cfg),), daemon=True)
        child.start()
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(child.pid, signal.SIGKILL)
        child.join(120)
        if child.exitcode is None:
            os.kill(child.pid, signal.SIGKILL)
            pytest.fail("`ragkit cache warm` did not finish within 120 s")
        assert child.exitcode in ((0, -signal.SIGKILL) if kill_after is not None else (0,))

    # A complete reference warm: its entries are what every surviving entry must equal.
    clear_cache(root)
    started = time.perf_counter()
    run(None)
    full_s = time.perf_counter() - started
    reference = tmp_path / "reference"
    shutil.copytree(root, reference)
    model = read_entry(entry_files(root)[0])[1]["model"]
    expected = {}  # file name -> (key, reference tensors)
    for path in entry_files(reference):
        tensors, meta = read_entry(path)
        expected[path.name] = (CacheKey(model, meta["dtype"], meta["prefix_hash"], meta["chunk_hash"]), tensors)
    assert len(expected) == len(DOCS) + 1

    rng = random.Random(7)
    partial = 0
    complete = True
    trial = 0
    # A busy machine can make the timed reference run slow and every later kill land too late, so
    # trials go on (up to 3x) until enough kills have landed mid-warm.
    while trial < TRIALS or (partial < 3 and trial < 3 * TRIALS):
        if complete or trial % 4 == 0:
            clear_cache(root)  # start over, so there is always work left to interrupt
        run(rng.uniform(0.0, full_s))
        store = KVStore(root, model, host_bytes=0)
        files = entry_files(root)
        partial += 0 < len(files) < len(expected)
        assert not list(root.rglob("*.tmp-*"))
        for path in files:
            key, want = expected[path.name]
            got = store.get(key)
            assert got is not None, f"trial {trial}: {path.name} is on disk but does not load"
            assert got.tensors().keys() == want.keys()
            assert all(torch.equal(t, want[name]) for name, t in got.tensors().items())
        assert store.stats()["tiers"]["disk"]["dropped"] == {}
        complete = len(files) == len(expected)
        trial += 1
    assert partial >= 3, "too few kills landed while entries were being written"
    print(f"{trial} kills of `ragkit cache warm` (a full run takes {full_s:.2f}s), {partial} mid-warm")

    run(None)  # a later warm completes the cache
    assert stats(cfg, "--verify")["verified"] == {"ok": len(expected), "dropped": {}}


def test_sigkill_of_a_real_ragkit_process_mid_warm(tiny):
    """The same through a fresh interpreter, killed once its first entries are on disk."""
    import subprocess
    import sys

    cfg, root = tiny
    clear_cache(root)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "ragkit.cli", "cache", "warm", str(cfg), "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(entry_files(root)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()  # SIGKILL
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    model = read_entry(entry_files(root)[0])[1]["model"]
    store = KVStore(root, model, host_bytes=0)
    files = entry_files(root)
    assert 3 <= len(files) < len(DOCS) + 1 and not list(root.rglob("*.tmp-*"))
    for path in files:
        tensors, meta = read_entry(path)  # raises on a half-written file
        assert store.get(CacheKey(model, meta["dtype"], meta["prefix_hash"], meta["chunk_hash"])) is not None
    result = warm(cfg)  # the next warm finishes the job
    assert result.stdout.startswith(f"warmed {len(DOCS) + 1 - len(files)} chunks")


def test_a_chunk_computed_in_one_cli_call_is_a_hit_in_the_next(tiny):
    """No per-process alias: `ragkit query --answer` stores what it computed in cache.dir, and the next
    call (a new pipeline, store and memory tiers) reuses it, exactly behind the same prefix and as a
    variant elsewhere."""
    from ragkit.pipeline import Pipeline

    cfg, root = tiny
    clear_cache(root)

    def ask(question: str) -> str:
        result = runner.invoke(app, ["query", str(cfg), question, "--answer", "-q", "--set",
                                     "generator.max_new_tokens=2"])
        assert result.exit_code == 0, result.output
        return result.stdout

    assert "cache hits: 0/5" in ask("item 3 relates")
    assert "cache hits: 5/5  recomputed tokens: 0/" in ask("item 3 relates")
    pipe = Pipeline.from_config(cfg, progress=False)
    first = {h.id for h in pipe.retrieve("item 3 relates", k=5)}
    overlaps = {q: len(first & {h.id for h in pipe.retrieve(q, k=5)})
                for q in ("study 4 item 9", "topic 12 document", "item 30 relates to item 10", "study 3")}
    question, shared = next((q, n) for q, n in overlaps.items() if 0 < n < 5)
    assert f"cache hits: {shared}/5" in ask(question)
