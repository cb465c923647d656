"""The Ray backend on a local two-node cluster: same rankings and nDCG@10 as one process, and kills.

One cluster (two nodes of one CPU each, `ray.cluster_utils.Cluster`) is shared by every test here.
SciFact BM25 runs on the whole bundled corpus; exact dense and hybrid on a slice of it (MiniLM
embeds about 20 documents per second on this machine)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

from ragkit.config import ClusterConfig
from ragkit.errors import RagkitError
from ragkit.pipeline import Pipeline
from ragkit.storage import recover_dir
from tests.test_crash_safety import IndexChecker, _config, _fork_builder, _kill, _rankings, _write_corpus

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT / "data" / "scifact"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"  # workers import this tree
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 << 20})
    cluster.add_node(num_cpus=1, object_store_memory=150 << 20)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _scifact_slice(root: Path, queries: int = 8, docs: int = 40) -> Path:
    """A BEIR folder: the first judged test queries, their relevant documents, then filler documents."""
    qrels = [line.split("\t") for line in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    kept = list(dict.fromkeys(q for q, _, _ in qrels))[:queries]
    wanted = {d for q, d, _ in qrels if q in kept}
    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        corpus = [json.loads(line) for line in fh]
    chosen = [d for d in corpus if d["_id"] in wanted] + [d for d in corpus if d["_id"] not in wanted]
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chosen[:max(docs, len(wanted))]))
    queries_file = [json.loads(line) for line in (SCIFACT / "queries.jsonl").read_text().splitlines()]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries_file if q["_id"] in kept))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        "\t".join(row) + "\n" for row in qrels if row[0] in kept))
    return root


def _pipeline(tmp: Path, name: str, data: Path, retrievers: str, cluster: str = "", fusion: str = "none") -> Pipeline:
    config = tmp / f"{name}.toml"
    config.write_text(f"""
name = "{name}"
[dataset]
path = "{data}"
[retrieval]
index_dir = "{tmp / 'indexes' / name}"
retrievers = {retrievers}
fusion = "{fusion}"
[eval]
runs_dir = "{tmp / 'runs'}"
{cluster}
""")
    return Pipeline.from_config(config, progress=False)


RAY = '[cluster]\nbackend = "ray"\nshards = 2'
CASES = {
    "bm25": ('[{ type = "bm25" }]', "none", False),
    "dense": ('[{ type = "dense", cache_dir = "CACHE" }]', "none", True),
    "hybrid": ('[{ type = "bm25" }, { type = "dense", cache_dir = "CACHE" }]', "rrf", True),
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """An embedding cache and a SciFact slice shared by the dense and hybrid cases (embedded once)."""
    root = tmp_path_factory.mktemp("shared")
    return root / "emb", _scifact_slice(root / "slice")


def _built(tmp: Path, data: Path, retrievers: str, fusion: str) -> tuple[Pipeline, Pipeline]:
    """One process, unsharded; and Ray with 2 shards: both indexed."""
    single = _pipeline(tmp, "single", data, retrievers, fusion=fusion)
    on_ray = _pipeline(tmp, "ray", data, retrievers, RAY, fusion=fusion)
    single.index()
    on_ray.index()
    return single, on_ray


@pytest.fixture(scope="module")
def scifact_bm25(two_nodes, tmp_path_factory):
    """Whole-SciFact BM25, built once for the ranking test and the kill test."""
    return _built(tmp_path_factory.mktemp("bm25"), SCIFACT, CASES["bm25"][0], "none")


@pytest.mark.parametrize("case", list(CASES))
def test_ray_two_shards_rank_like_one_process(two_nodes, shared, tmp_path, request, case):
    retrievers, fusion, dense = CASES[case]
    if dense:
        single, on_ray = _built(tmp_path, shared[1], retrievers.replace("CACHE", str(shared[0])), fusion)
    else:
        single, on_ray = request.getfixturevalue("scifact_bm25")
    assert len(on_ray.retrievers[0].manifest["shards"]) == 2
    texts = [q.text for q in single.queries()]
    expected, got = single.retrieve_batch(texts, 100), on_ray.retrieve_batch(texts, 100)
    assert [[h.id for h in hits] for hits in got] == [[h.id for h in hits] for hits in expected]
    for a, b in zip(got, expected):
        # BM25 scores are equal; embeddings computed in other batches differ in the last float bits
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=0 if case == "bm25" else 1e-5)
    single_ndcg = single.evaluate()["aggregate"]["ndcg@10"]
    assert round(on_ray.evaluate()["aggregate"]["ndcg@10"], 4) == round(single_ndcg, 4)
    if case == "bm25":
        assert round(single_ndcg, 4) == 0.6797  # BEIR SciFact Lucene BM25 with ragkit's chunking


def test_killed_ray_worker_is_retried_or_stops_the_build(scifact_bm25):
    """SIGKILL the worker running a BM25 build task: Ray retries it, or the build stops with an
    error; either way the folder then holds a complete index (the previous or the new), never a part."""
    single, built = scifact_bm25
    questions = ["vitamin D bone fracture", "statins and heart disease", "sleep and memory"]
    reference = single.retrieve_batch(questions, 20)
    on_ray = Pipeline(built.config, progress=False)
    killed: list[int] = []

    def kill_a_build_task():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for proc in psutil.process_iter(["cmdline"]):
                title = " ".join(proc.info["cmdline"] or [])
                if title.startswith(("ray::_bm25_stats", "ray::_bm25_shard")):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_a_build_task)
    killer.start()
    try:
        on_ray.index()
        outcome = "retried"
    except RagkitError as exc:
        assert "failed after" in str(exc)
        outcome = "stopped"
    killer.join()
    assert killed, "no build task was seen running"
    folder = on_ray.config.index_dir()
    recover_dir(folder)
    fresh = Pipeline(dataclasses.replace(built.config, cluster=ClusterConfig(shards=2)), progress=False)
    assert fresh.retrieve_batch(questions, 20) == reference, outcome  # loaded in this process
    assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))


def test_sigkill_during_a_sharded_local_build_leaves_the_old_index_or_none(tmp_path):
    """The crash-safety check of test_crash_safety, on the sharded layout (three BM25 shards)."""
    _write_corpus(tmp_path / "data")
    config, folder = _config(tmp_path, "sharded")
    config.write_text(config.read_text() + "\n[cluster]\nshards = 3\n")
    Pipeline.from_config(config, progress=False).index()
    assert len(list((folder / "retriever-0").glob("shard-*"))) == 3
    reference = _rankings(config)
    checker = IndexChecker(config, folder, reference)
    builder = Pipeline.from_config(config, progress=False)
    tokenizer = builder._tokenizer()
    builder._tokenizer = lambda: tokenizer
    for trial in range(8):
        child = _fork_builder(builder)
        time.sleep(0.05 + 0.1 * trial)
        _kill(child)
        checker.check_after_kill(lambda: Pipeline.from_config(config, progress=False).index())
    assert sum(checker.found.values()) == 8
