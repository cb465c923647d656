"""Rerank stages, query expansion and the LLM reply cache, end to end on a tiny corpus and a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from chunk_cache.batch import BatchPrompt, sub_batches
from chunk_cache.store import ChunkKV
from generators.listwise import ListwiseReranker, repair
from generators.pointwise import PointwiseScorer
from ragkit.cli import app
from ragkit.config import from_dict
from ragkit.errors import ConfigError
from ragkit.pipeline import Pipeline
from ragkit.types import Chunk, Hit, Query
from retrievers.rerank import reorder
from tests.conftest import tiny_llama
from tests.test_pipeline import make_beir, make_config

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    """Attention far from uniform: a row at a wrong position or a padding row seen changes the scores."""
    return tiny_llama(tmp_path_factory.mktemp("sharp"), init_range=0.2)


def rerank_config(tmp_path: Path, llama: Path, stages: str, query: str = "") -> Path:
    make_beir(tmp_path / "data")
    return make_config(tmp_path, f"""
[generator]
model = "{llama}"
[cache]
dir = "{tmp_path / 'kv'}"
[llm]
cache_dir = "{tmp_path / 'llm'}"
[rerank]
stages = {stages}
{query}
""")


# --- pointwise on cached chunk KV ---------------------------------------------------------------
def test_pointwise_cached_scores_equal_uncached_and_compute_only_the_question(tmp_path, llama):
    pipe = Pipeline.from_config(rerank_config(tmp_path, llama, "[]"), progress=False)
    chunks = [pipe.chunk(f"d{i}#0") for i in range(1, 7)]
    rag = pipe.generator
    cached, full = PointwiseScorer(rag, cached=True), PointwiseScorer(rag, cached=False)
    question = "vitamin D and fractures"
    first = cached.score(question, chunks)  # nothing warmed: every prompt computed whole here, its chunk stored
    rows_first = cached.stats.computed_rows
    again = cached.score(question, chunks)
    reference = full.score(question, chunks)
    assert max(abs(a - b) for a, b in zip(again, reference)) <= 1e-4
    assert max(abs(a - b) for a, b in zip(first, reference)) <= 1e-4
    tail = len(cached.segments(question, chunks[0])[-1].token_ids)
    assert rows_first == sum(len(s.token_ids) for c in chunks for s in cached.segments(question, c))
    rows_again = cached.stats.computed_rows - rows_first
    assert rows_again == tail * len(chunks)  # the second pass computed the question rows only
    assert full.stats.computed_rows == sum(len(s.token_ids) for c in chunks for s in full.segments(question, c))


@pytest.mark.parametrize("title", [False, True])  # titles make the question rows differ in length too
def test_pointwise_batch_of_different_lengths_scores_each_prompt_as_alone(tmp_path, sharp_llama, title):
    pipe = Pipeline.from_config(rerank_config(tmp_path, sharp_llama, "[]"), progress=False)
    chunks = [pipe.chunk(f"d{i}#0") for i in range(1, 7)]
    question = "vitamin D and fractures"
    rag = pipe.generator
    one_by_one = PointwiseScorer(rag, cached=False, title=title, batch_size=1)
    tails = [len(one_by_one.segments(question, c)[-1].token_ids) for c in chunks]
    assert len({len(c.token_ids) for c in chunks}) > 2 and (len(set(tails)) > 1) == title
    reference = one_by_one.score(question, chunks)
    rag.warm(chunks[:4], progress=False)  # the last two are cold: prefilled alone and stored beside the batch
    cached = PointwiseScorer(rag, cached=True, title=title, batch_size=3)  # batches of 3: a partial last one
    first = cached.score(question, chunks)
    lengths = [sum(len(s.token_ids) for s in cached.segments(question, c)) for c in chunks]
    assert cached.stats.computed_rows == sum(tails[:4]) + sum(lengths[4:])
    again = cached.score(question, chunks)  # all six from the store now: question rows only
    assert cached.stats.computed_rows - sum(tails[:4]) - sum(lengths[4:]) == sum(tails)
    uncached = PointwiseScorer(rag, cached=False, title=title)  # short prompts: all six in one forward
    for scores in (first, again, uncached.score(question, chunks)):
        assert max(abs(a - b) for a, b in zip(scores, reference)) <= 1e-4
    assert uncached.stats.computed_rows == sum(lengths)
    assert max(reference) - min(reference) > 0.1  # far apart at this tolerance: a swapped row would show


def test_sub_batches_group_prompts_of_similar_length_up_to_a_full_forward():
    def prompt(reused: int, computed: int) -> BatchPrompt:
        return BatchPrompt([ChunkKV(torch.zeros(1, 1, reused, 2), torch.zeros(1, 1, reused, 2), 0)],
                           (1,) * computed)

    prompts = [prompt(r, 32) for r in (300, 90, 410, 120, 95, 250, 400, 130, 280, 100, 115)]
    groups = sub_batches(prompts, batch_size=32)
    assert sorted(i for g in groups for i in g) == list(range(11))
    assert [len(g) for g in groups] == [8, 3]  # 256 computed rows per forward at 32 rows a prompt
    assert [prompts[i].reused_rows for g in groups for i in g] == sorted(p.reused_rows for p in prompts)
    assert prompts[groups[1][0]].reused_rows == 300
    assert [len(g) for g in sub_batches(prompts, batch_size=4)] == [4, 4, 3]
    assert [len(g) for g in sub_batches([prompt(0, 400)] * 3, batch_size=32)] == [1, 1, 1]  # each fills one


def test_pointwise_title_goes_after_the_passage(tmp_path, llama):
    pipe = Pipeline.from_config(rerank_config(tmp_path, llama, "[]"), progress=False)
    chunk = pipe.chunk("d1#0")
    plain, titled = PointwiseScorer(pipe.generator), PointwiseScorer(pipe.generator, title=True)
    assert plain.segments("q", chunk)[:2] == titled.segments("q", chunk)[:2]
    assert "Vitamin D" in pipe.generator.prompt.tokenizer.decode(list(titled.segments("q", chunk)[2].token_ids))
    assert "Vitamin D" not in pipe.generator.prompt.tokenizer.decode(list(plain.segments("q", chunk)[2].token_ids))


# --- listwise ------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, order, repaired", [
    ("[3] > [1] > [2]", [2, 0, 1], False),
    ("3, 1, 2", [2, 0, 1], False),
    ("[2] > [2] > [9] > [1]", [1, 0, 2], True),  # duplicate and unknown dropped, [3] appended
    ("I cannot rank these.", [0, 1, 2], True),
    ("[1] > [3]", [0, 2, 1], True),
])
def test_repair_turns_any_reply_into_a_permutation(reply, order, repaired):
    assert repair(reply, 3) == (order, repaired)


class ScriptedLLM:
    identity = "scripted"

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def complete(self, messages, max_tokens, temperature=0.0):
        self.prompts.append(messages)
        return self.replies.pop(0)


def _chunks(n):
    return [Chunk(f"d{i}#0", f"d{i}", f"passage {i}", (1,), (0, 1), str(i)) for i in range(n)]


def test_listwise_slides_windows_bottom_up_and_repairs_bad_replies():
    llm = ScriptedLLM(["[3] > [1]", "[3] > [2] > [1]"])  # window 3..4 (bad reply), then window 0..2
    ranker = ListwiseReranker(llm, window=3, step=2)
    order = ranker.order("q", _chunks(5))
    # window [2, 3, 4] -> reply "[3] > [1]" repaired to [4, 2, 3]; then window [0, 1, 4] -> [4, 1, 0]
    assert order == [4, 1, 0, 2, 3]
    assert (ranker.windows, ranker.repaired) == (2, 1)
    assert "passage 4" in llm.prompts[0][1]["content"] and "passage 0" not in llm.prompts[0][1]["content"]


def test_reorder_keeps_the_tail_and_gives_strictly_decreasing_scores():
    hits = [Hit(f"d{i}", 1.0, i + 1) for i in range(5)]
    out = reorder(hits, [0.1, 0.9, 0.1])
    assert [h.id for h in out] == ["d1", "d0", "d2", "d3", "d4"]
    assert [h.score for h in out] == [5.0, 4.0, 3.0, 2.0, 1.0]


# --- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, key", [
    ({"rerank": {"stages": [{"type": "monot5"}]}}, "rerank.stages[0].type"),
    ({"rerank": {"stages": [{"type": "llm-pointwise", "depth": 0}]}}, "rerank.stages[0].depth"),
    ({"rerank": {"stages": [{"type": "cross-encoder", "window": 3}]}}, "rerank.stages[0].window"),
    ({"rerank": {"stages": [{"type": "llm-listwise", "window": 5, "step": 6}]}}, "rerank.stages[0].step"),
    ({"query": {"expansion": "rm3"}}, "query.expansion"),
    ({"llm": {"backend": "openai"}}, "llm.base_url"),
    ({"generator": {"backend": "openai"}, "llm": {"base_url": "localhost:8000"}}, "llm.base_url"),
])
def test_bad_rerank_query_llm_keys_name_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        from_dict({"dataset": {"path": "x"}, **data})
    assert f"'{key}'" in str(info.value)


# --- eval: stages side by side, cache, bad input -------------------------------------------------
STAGES = ('[{ type = "bi-encoder", depth = 5 }, { type = "llm-pointwise", depth = 4 }, '
          '{ type = "llm-listwise", depth = 4, window = 3, step = 2, max_tokens = 8 }]')


def test_eval_scores_every_stage_and_a_rerun_asks_the_llm_nothing(tmp_path, llama):
    config = rerank_config(tmp_path, llama, STAGES, '[query]\nexpansion = "reason"\nmax_tokens = 8')
    first = runner.invoke(app, ["eval", str(config), "--quiet", "--no-answers"])
    assert first.exit_code == 0, first.output
    run_dir = tmp_path / "runs" / "tiny"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stages"] == ["retrieval", "bi-encoder@5", "llm-pointwise@4", "llm-listwise@4"]
    for prefix in ("", "first_stage_", "stage1_", "stage2_"):
        assert f"{prefix}ndcg@10" in results["aggregate"]
    assert {"run.trec", "run.first_stage.trec", "run.stage1.trec", "run.stage2.trec"} <= {
        p.name for p in run_dir.iterdir()}
    # 3 expansions, pointwise pairs and listwise windows: all computed once
    assert results["counts"]["llm_calls"] >= 3 + 3 and results["counts"]["llm_cache_hits"] == 0
    runs = {p.name: p.read_text() for p in run_dir.glob("*.trec")}

    again = runner.invoke(app, ["eval", str(config), "--quiet", "--no-answers"])
    assert again.exit_code == 0, again.output
    rerun = json.loads((run_dir / "results.json").read_text())
    assert rerun["counts"]["llm_calls"] == 0
    assert rerun["counts"]["llm_cache_hits"] == results["counts"]["llm_calls"]
    assert {p.name: p.read_text() for p in run_dir.glob("*.trec")} == runs
    assert rerun["aggregate"] == results["aggregate"]


def test_cross_encoder_stage_runs_a_local_sequence_classifier(tmp_path, llama):
    import transformers

    from generators.weights import resolve_model_dir

    folder = tmp_path / "cross"
    config = transformers.BertConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37, num_labels=1)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(resolve_model_dir("smollm2")).save_pretrained(folder)
    cfg = rerank_config(tmp_path, llama, f'[{{ type = "cross-encoder", model = "{folder}", depth = 3 }}]')
    result = Pipeline.from_config(cfg, progress=False).evaluate(answers=False)
    assert result["stages"] == ["retrieval", "cross-encoder@3"]
    assert "first_stage_mrr" in result["aggregate"] and "mrr" in result["aggregate"]


def test_missing_cross_encoder_folder_exits_2_naming_it(tmp_path, llama):
    missing = tmp_path / "no-such-model"
    cfg = rerank_config(tmp_path, llama, f'[{{ type = "cross-encoder", model = "{missing}" }}]')
    result = runner.invoke(app, ["eval", str(cfg), "--quiet", "--no-answers"])
    assert result.exit_code == 2
    assert str(missing) in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "runs" / "tiny").exists()


# --- answering retrieves through the second stage ------------------------------------------------
def test_answers_get_the_expanded_and_reranked_chunks(tmp_path, sharp_llama):
    cfg = rerank_config(tmp_path, sharp_llama, '[{ type = "llm-pointwise", depth = 5 }]',
                        '[query]\nexpansion = "query2doc"\nmax_tokens = 6')
    pipe = Pipeline.from_config(cfg, {"generator": {"chunks": 2, "max_new_tokens": 2}}, progress=False)
    questions = ["risk in older adults", "lower risk of disease in adults", "adults and the risk of lower mortality"]
    expanded = pipe.second_stage.texts([Query(str(i), q) for i, q in enumerate(questions)])
    assert expanded != questions and pipe.second_stage.summary()["llm_calls"] == 3
    scorer = PointwiseScorer(pipe.generator)
    expected, first_stage = [], []
    for question, text in zip(questions, expanded):
        hits = pipe.retrieve(text, k=5)  # what the expansion retrieves, then the pointwise order of those five
        scores = scorer.score(question, [pipe.chunk(h.id) for h in hits])
        expected.append([hits[i].id for i in sorted(range(len(hits)), key=lambda i: (-scores[i], i))[:2]])
        first_stage.append([h.id for h in hits[:2]])
    assert expected != first_stage  # the stage reorders here, so the check below can tell
    assert [[c.id for c in chunks] for chunks in pipe.chunks_for(questions)] == expected
    calls = pipe.second_stage.summary()["llm_calls"]
    assert pipe.ask(questions[0]).chunk_ids == expected[0]
    assert [a.chunk_ids for a in pipe.ask_many(questions)] == expected
    assert pipe.second_stage.summary()["llm_calls"] == calls  # expansions and scores from the disk cache
