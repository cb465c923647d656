"""One way into answering: the same questions through `ask`, `ask_many`, `eval --reference full` and the
server's /answer give, in every reuse mode, the greedy answers the generator gives one at a time on the
same sequence of store states (SmolLM2, fp32, a fresh memory store per entry point)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from chunk_cache.modes import MODES
from chunk_cache.store import KVStore
from ragkit.pipeline import Pipeline
from ragkit.serve import ServeOptions, build_server, create_app

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # SmolLM2 answers 2 questions 7 times per mode

DOCS = [("d1", "Vitamin D", "Vitamin D supplements reduce the risk of bone fractures in older adults."),
        ("d2", "Statins", "Statins lower cholesterol and the risk of heart attacks."),
        ("d3", "Sleep", "Short sleep is linked to obesity in children and adults."),
        ("d4", "Paris", "Paris is the capital of France and lies on the river Seine.")]
# both retrieve the statins passage: the second answer reuses what the first stored
QUESTIONS = [("q1", "What lowers the risk of heart attacks?", "d2", "statins"),
             ("q2", "What do statins lower?", "d2", "cholesterol")]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("entry")
    data = root / "data"
    (data / "qrels").mkdir(parents=True)
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": t, "text": x}) + "\n"
                                               for d, t, x in DOCS))
    (data / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t, "answers": [a]}) + "\n"
                                                for q, t, _d, a in QUESTIONS))
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t1\n" for q, _t, d, _a in QUESTIONS))
    path = root / "entry.toml"
    path.write_text(f"""name = "entry"
[dataset]
format = "beir"
path = "{data}"
[retrieval]
index_dir = "{root / 'index'}"
[chunking]
size = 64
overlap = 8
[generator]
model = "smollm2"
max_new_tokens = 5
chunks = 2
[cache]
dir = ""
[eval]
runs_dir = "{root / 'runs'}"
""")
    return path


@pytest.fixture(scope="module")
def pipe(config) -> Pipeline:
    return Pipeline.from_config(config, progress=False)


def _fresh(pipe: Pipeline) -> None:
    pipe.generator.store = KVStore(None, pipe.generator.fingerprint)


def _configure(pipe: Pipeline, mode: str) -> None:
    """cache.mode = mode, as a config with that mode would load (one model load for every mode)."""
    pipe.config.cache.mode = mode
    pipe.generator.settings = dataclasses.replace(pipe.generator.settings, mode=mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_entry_point_answers_as_one_at_a_time(pipe, config, mode):
    _configure(pipe, mode)
    texts = [text for _q, text, _d, _a in QUESTIONS]
    retrieved = pipe.chunks_for(texts)
    rag = pipe.generator
    _fresh(pipe)
    alone = [rag.answer(text, chunks).text for text, chunks in zip(texts, retrieved)]
    _fresh(pipe)
    full = [rag.answer(text, chunks, mode="full").text for text, chunks in zip(texts, retrieved)]

    _fresh(pipe)
    assert [pipe.ask(text).text for text in texts] == alone
    _fresh(pipe)
    assert [answer.text for answer in pipe.ask_many(texts)] == alone
    _fresh(pipe)
    results = pipe.evaluate(answers=True, reference="full")
    records = {r["query_id"]: r for r in map(json.loads, open(Path(results["run_dir"]) / "answers.jsonl"))}
    assert [records[q]["answer"] for q, *_ in QUESTIONS] == alone
    assert [records[q]["reference_answer"] for q, *_ in QUESTIONS] == full
    if mode == "full":  # the mode against itself: every forced token agrees, the first-token KL is zero
        assert all(r["agreement"] == 1.0 and abs(r["kl"]) < 1e-6 for r in records.values())
    _fresh(pipe)
    client = TestClient(create_app(build_server(pipe, ServeOptions(preferences=config.parent / "prefs.jsonl"))))
    served = [client.post("/answer", json={"question": text, "k": 2, "max_tokens": 5, "mode": mode,
                                           "temperature": 0}).json()["answer"] for text in texts]
    assert served == alone
    assert pipe.engine.idle
