"""`ragkit bench answer`'s pieces on a tiny random Llama (2 questions, 2 new tokens), and its flag checks."""

from __future__ import annotations

import dataclasses
import sys

import pytest
from typer.testing import CliRunner

from ragkit.bench import answer
from ragkit.cli import app
from ragkit.config import CacheConfig, GeneratorConfig
from ragkit.types import Chunk, token_hash
from tests.conftest import tiny_llama

TEXTS = ["Paris is the capital of France.", "The Seine flows through Paris.", "Berlin is in Germany."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from generators.rag import RagGenerator

    folder = tiny_llama(tmp_path_factory.mktemp("bench-answer") / "model")
    generator = {**dataclasses.asdict(GeneratorConfig()), "model": str(folder), "max_new_tokens": 2, "device": "cpu"}
    rag = RagGenerator(generator, {**dataclasses.asdict(CacheConfig()), "dir": "", "mode": "blend"})
    chunks = []
    for i, text in enumerate(TEXTS):
        ids = rag.prompt.chunk_ids(text)
        chunks.append(Chunk(id=f"d{i}#0", doc_id=f"d{i}", text=text, token_ids=ids, span=(0, 0),
                            content_hash=token_hash(ids)))
    items = [("What is the capital of France?", chunks[:2], ["Paris"]),
             ("Where is Berlin?", chunks[1:], ["Germany"])]
    return folder, rag, items


def test_percentile_is_nearest_rank():
    assert answer.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert answer.percentile([float(v) for v in range(1, 11)], 0.9) == 9.0
    assert answer.percentile([5.0], 0.9) == 5.0


def test_prompt_ids_hold_every_chunk_in_order(tiny):
    _folder, rag, items = tiny
    question, chunks, _golds = items[0]
    ids = answer.prompt_ids(rag, question, chunks)
    assert list(ids[:len(rag.prompt.head_ids)]) == list(rag.prompt.head_ids)
    first = list(chunks[0].token_ids)
    at = next(i for i in range(len(ids)) if ids[i:i + len(first)] == first)
    assert ids.index(chunks[1].token_ids[0], at + len(first)) > at


def test_cold_hit_rate_counts_chunks_stored_by_earlier_questions(tiny, tmp_path):
    _folder, rag, items = tiny
    answer.fresh_store(rag, tmp_path / "kv", 1 << 30)
    cold = answer.answer_all(rag, items)
    assert cold["hit_rate"] == 0.25  # the second question finds the chunk the first one stored, of 4 lookups
    again = answer.answer_all(rag, items)
    assert again["hit_rate"] == 1.0
    assert again["questions"] == 2 and again["ttft_p50_s"] <= again["ttft_p90_s"]


def test_compare_modes_scores_every_mode_against_full(tiny, tmp_path):
    _folder, rag, items = tiny
    answer.fresh_store(rag, tmp_path / "kv", 1 << 30)
    rag.warm([c for _q, chunks, _g in items for c in chunks], progress=False)
    logged = []
    result = answer.compare_modes(rag, items, ["blend", "prefix"], batch=2, log=logged.append)
    assert list(result) == ["full", "blend", "prefix"] and len(logged) == 2 + 3
    assert result["full"]["agreement_vs_full"] == 1.0 and result["full"]["kl_vs_full"] == 0.0
    assert result["blend"]["hit_rate"] == 1.0
    for mode, r in result.items():
        assert 0.0 <= r["agreement_vs_full"] <= 1.0 and r["kl_vs_full"] >= 0.0 and 0.0 <= r["f1"] <= 1.0
        assert r["questions_per_s"] > 0 and r["questions_per_s_batched"] > 0 and len(r["answers"]) == 2


def test_transformers_baseline_runs_beside_full_and_decodes_its_tokens(tiny, tmp_path):
    folder, rag, items = tiny
    answer.fresh_store(rag, tmp_path / "kv", 1 << 30)
    hf_answer = answer.transformers_generate(folder, rag)
    asked = []

    def baseline(question, chunks):
        asked.append(question)
        return hf_answer(question, chunks)

    result = answer.compare_modes(rag, items, ["blend"], batch=2, log=lambda _m: None, baseline=baseline)
    hf = result.pop("transformers")
    assert asked == [q for q, _c, _g in items] and list(result) == ["full", "blend"]
    assert hf["same_tokens_as_ragkit_full"] == "2/2"
    assert hf["ragkit_full_ttft_vs_hf"] > 0 and hf["hf_ttft_p50_s"] > 0 and hf["hf_generate_questions_per_s"] > 0

    asked.clear()  # --baseline-questions 1: transformers answers the first question only, compared with full's first
    hf = answer.compare_modes(rag, items, ["blend"], batch=2, log=lambda _m: None, baseline=baseline,
                              baseline_questions=1)["transformers"]
    assert asked == [items[0][0]] and hf["same_tokens_as_ragkit_full"] == "1/1"


def test_forced_answer_matches_a_plain_answer(tiny, tmp_path):
    """Teacher forcing from the answer's own prefill must leave its greedy tokens as a plain answer's."""
    _folder, rag, items = tiny
    answer.fresh_store(rag, tmp_path / "kv", 1 << 30)
    question, chunks, _golds = items[0]
    plain = rag.answer(question, chunks, mode="full")
    got, _logits, predicted = answer.answer_forced(rag, question, chunks, "full", plain.tokens)
    assert got.tokens == plain.tokens and predicted == plain.tokens


def test_llama_cpp_is_reported_unavailable_with_the_reason(tiny, monkeypatch):
    _folder, rag, items = tiny
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as when the package is absent
    result = answer.llama_cpp_baseline(tiny[0] / "none.gguf", rag, items, 1)
    assert result["available"] is False and "llama-cpp-python" in result["reason"]


@pytest.mark.parametrize("flags", [["--questions", "0"], ["--modes", "full,bogus"], ["--warm", "some"],
                                   ["--musique-config", "missing.toml"], ["--batch", "0"],
                                   ["--set", "cache.ratio=1.5"], ["--set", "cache.bogus=1"]])
def test_cli_refuses_bad_flags_before_loading_a_model(flags, monkeypatch):
    def no_run(*_args, **_kwargs):
        raise AssertionError("the bench ran")

    monkeypatch.setattr(answer, "run", no_run)
    result = CliRunner().invoke(app, ["bench", "answer", *flags])
    assert result.exit_code == 2, result.output


def test_report_lists_modes_in_run_order_and_says_why_llama_cpp_is_missing(tiny, tmp_path):
    _folder, rag, items = tiny
    answer.fresh_store(rag, tmp_path / "kv", 1 << 30)
    cold = answer.cold_vs_full(rag, items)
    assert cold["full"]["hit_rate"] == 0.0 and cold["questions_per_s_vs_full"] > 0
    modes = answer.compare_modes(rag, items, ["naive", "blend"], batch=2, log=lambda _m: None)
    dataset = {"questions": 2, "chunks_per_question": 2, "prompt_tokens_mean": 50.0, "max_new_tokens": 2, "ratio": 0.25,
               "cold": cold, "query_log": {"skipped": "no query-log split for this dataset"},
               "corpus_warm": {"scope": "retrieved", "warmed_chunks": 3, "warm_s": 0.1, "warm_s_per_chunk": 0.03},
               "modes": dict(sorted(modes.items()))}  # as JSON output sorts them
    result = {"setting": {"modes": list(modes)}, "musique": dataset, "scifact": dataset,
              "transformers": {"hf_ttft_p50_s": 1.0, "ragkit_full_ttft_p50_s": 0.5, "ragkit_full_ttft_vs_hf": 0.5,
                               "hf_generate_questions_per_s": 1.0, "same_tokens_as_ragkit_full": "2/2"},
              "llama_cpp": {"available": False, "reason": "no module"}, "batched_speedup_vs_sequential": 2.0,
              "blend_speedup_vs_hf_full": 3.0, "blend_f1_minus_full_f1": 0.0, "hit_rate_warm": 1.0}
    lines = answer.format_report(result).splitlines()
    rows = [line.split()[0] for line in lines if line.strip().split(" ")[0] in modes]
    assert rows == ["full", "naive", "blend"] * 2
    assert lines[0].endswith("max_new_tokens 2, cache.ratio 0.25")
    assert "llama.cpp: unavailable (no module)" in lines and any("no query-log split" in line for line in lines)
