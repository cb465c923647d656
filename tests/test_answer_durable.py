"""An answer returned means its computed chunks are on disk: the store writes them on its own thread
(off the path to the first token), and the engine reports a request answered only once its writes are
done. A process killed with SIGKILL right after `ask` returned leaves every chunk it computed stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from chunk_cache.store import cache_stats
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["Paris is the capital of France and lies on the river Seine.",
        "Rome is the capital of Italy and lies on the river Tiber.",
        "Berlin is the capital of Germany and lies on the river Spree."]

CHILD = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from chunk_cache import disk
    from ragkit.pipeline import Pipeline

    write = disk.DiskTier.write
    def slow_write(self, *args, **kwargs):  # a slow disk: each entry takes 0.5 s to land
        time.sleep(0.5)
        return write(self, *args, **kwargs)
    disk.DiskTier.write = slow_write

    pipe = Pipeline.from_config(sys.argv[1], progress=False)
    answer = pipe.ask("What is the capital of France?")
    print("ANSWERED", len(answer.chunk_ids), answer.cache_hits, flush=True)
    time.sleep(120)
""")


def test_sigkill_after_an_answer_returned_loses_no_stored_chunk(tmp_path):
    model = tiny_llama(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n"
                                               for i, text in enumerate(DOCS)))
    config = tmp_path / "durable.toml"
    config.write_text(f"""name = "durable"
[dataset]
format = "jsonl"
path = "{data}"
[retrieval]
index_dir = "{tmp_path / 'index'}"
[generator]
model = "{model}"
max_new_tokens = 1
chunks = 3
[cache]
mode = "blend"
dir = "{tmp_path / 'kv'}"
""")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(config)], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    try:
        line = child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)  # at once: nothing written after the answer was returned survives
    finally:
        child.kill()
        child.wait(30)
    assert line.startswith("ANSWERED"), child.stderr.read()[-3000:]
    _, chunks, hits = line.split()
    assert (int(chunks), int(hits)) == (3, 0)  # a cold cache: every chunk computed here
    stats = cache_stats(tmp_path / "kv", verify=True)
    assert stats["entries"] == int(chunks) + 1 and stats["verified"]["ok"] == int(chunks) + 1  # and the head
