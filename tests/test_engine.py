"""The batched answering engine against one-at-a-time answers on SmolLM2 (fp32, short prompts)."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import torch

from chunk_cache.store import KVStore
from generators.engine import AnswerEngine, Request, group_order
from generators.model import decode_attention
from ragkit.types import Chunk, token_hash
from tests import test_reuse

torch.set_num_threads(1)
rag = test_reuse.rag  # the generator fixture: SmolLM2 fp32, 8 new tokens, a memory-only store
DATA = Path(__file__).resolve().parents[1] / "data" / "musique" / "musique_s.json.gz"


def test_decode_attention_reads_grouped_heads_like_repeated_heads_with_padding():
    g = torch.Generator().manual_seed(0)
    B, H, H_kv, T, D = 3, 6, 2, 20, 8
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    key_pos = torch.arange(T).repeat(B, 1)
    key_pos[1, 12:] = -1  # a shorter row, right-padded
    key_pos[2, 5:8] = -1  # empty slots inside a row
    query_pos = torch.tensor([[25], [11], [30]])
    got = decode_attention(q, k, v, key_pos, query_pos, 0.3)
    k_rep, v_rep = k.repeat_interleave(H // H_kv, 1), v.repeat_interleave(H // H_kv, 1)
    for b in range(B):
        seen = key_pos[b] >= 0
        expected = ((q[b] @ k_rep[b][:, seen].transpose(-1, -2)) * 0.3).softmax(-1) @ v_rep[b][:, seen]
        assert torch.allclose(got[b], expected, atol=1e-5)


def test_group_order_puts_questions_sharing_chunks_together():
    sets = [{"a", "b"}, {"x"}, {"c", "d"}, {"a", "e"}, {"c"}, {"b", "a", "f"}, {"y"}]
    order = group_order(sets, group_size=3)
    assert sorted(order) == list(range(len(sets)))
    assert set(order[:3]) == {0, 3, 5}  # the most shared chunks (a, b) first, with all that share them
    assert set(order[3:5]) == {2, 4}  # then c's group
    assert order[5:] == [1, 6]  # nothing shared: submission order
    assert group_order(sets, group_size=2)[:2] in ([0, 5], [5, 0])  # a group never exceeds its size


# --- on the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def requests(rag):
    """Five questions over overlapping chunks of different lengths, in three modes."""
    examples = json.loads(gzip.open(DATA).read())[:3]
    chunks = []
    for j, example in enumerate(examples):
        for i, ctx in enumerate(example["ctxs"][:3]):
            ids = rag.prompt.chunk_ids(ctx["text"])[: 24 + 6 * i]
            chunks.append(Chunk(id=f"m{j}#{i}", doc_id=f"m{j}", text="", token_ids=ids, span=(0, 0),
                                content_hash=token_hash(ids)))
    q = [example["question"] for example in examples]
    return [Request(q[0], chunks[0:3], "blend"), Request(q[1], chunks[3:6], "naive"),
            Request(q[0] + " Explain.", [chunks[1], chunks[0], chunks[4]], "full"),
            Request(q[2], chunks[6:9], "blend"), Request(q[1], chunks[3:5] + [chunks[8]], "blend")]


def _fresh_store(rag, requests):
    """The same starting state for every run: a memory store with the first two questions' chunks warmed."""
    rag.store = KVStore(None, rag.fingerprint)
    rag.warm([c for r in requests[:2] for c in r.chunks], progress=False)


def _one_at_a_time(rag, requests, order):
    _fresh_store(rag, requests)
    return {i: rag.answer(requests[i].question, requests[i].chunks, mode=requests[i].mode) for i in order}


@pytest.fixture(scope="module")
def alone(rag, requests):
    """One-at-a-time answers, asked in the order the engine runs the requests."""
    order = group_order([{c.content_hash for c in r.chunks} for r in requests], 4)
    answers = _one_at_a_time(rag, requests, order)
    return [answers[i] for i in range(len(requests))]


FIELDS = ["text", "tokens", "chunk_ids", "mode", "cache_hits", "context_tokens", "recomputed_tokens"]


@pytest.mark.slow
def test_engine_answers_equal_one_at_a_time_answers(rag, requests, alone):
    _fresh_store(rag, requests)
    engine = AnswerEngine(rag, max_batch=4)
    batched = engine.run(requests)
    for mine, reference in zip(batched, alone):
        assert {f: getattr(mine, f) for f in FIELDS} == {f: getattr(reference, f) for f in FIELDS}
        assert 0 < mine.ttft_s <= mine.total_s
    assert engine.peak_rows == 4 and engine.idle and engine.cache is None
    assert any(a.recomputed_tokens for a in alone) and any(a.cache_hits for a in alone)


@pytest.mark.slow
def test_budgets_and_stops_per_request_and_a_finished_row_leaves_the_batch(rag, requests, alone):
    stop = alone[1].tokens[2]
    expected = [alone[0].tokens[:1], alone[1].tokens[: alone[1].tokens.index(stop)], alone[2].tokens]
    _fresh_store(rag, requests)
    engine = AnswerEngine(rag, max_batch=4)
    streamed: list[str] = []
    tickets = [engine.submit(dataclasses.replace(requests[0], max_new_tokens=1)),
               engine.submit(dataclasses.replace(requests[1], stop_ids=frozenset({stop}))),
               engine.submit(dataclasses.replace(requests[2], on_token=streamed.append))]
    first = engine.step()
    assert [t for t, _ in first] == [tickets[0]] and len(engine.rows) == 2  # its budget was one token
    answers = dict(first)
    while not engine.idle:
        answers.update(engine.step())
    assert [answers[t].tokens for t in tickets] == expected
    assert "".join(streamed).strip() == alone[2].text


@pytest.mark.slow
def test_a_request_joining_mid_decode_gets_its_answer_alone(rag, requests, alone):
    _fresh_store(rag, requests)
    engine = AnswerEngine(rag, max_batch=4)
    engine.submit(requests[2])  # full prefill: stores nothing, so the joiner sees the state it would alone
    engine.step(), engine.step()
    assert len(engine.rows) == 1 and len(engine.rows[0].tokens) == 2
    late = engine.submit(requests[0])
    answers = {}
    while not engine.idle:
        answers.update(engine.step())
    assert answers[late].tokens == _one_at_a_time(rag, requests, [0])[0].tokens
    assert answers[0].tokens == alone[2].tokens


@pytest.mark.slow
def test_a_cancelled_request_frees_its_row_and_the_others_go_on(rag, requests, alone):
    _fresh_store(rag, requests)
    engine = AnswerEngine(rag, max_batch=4)
    dropped = engine.submit(requests[0])
    kept = engine.submit(requests[2])  # full prefill: its answer does not depend on what the store holds
    engine.step(), engine.step()
    assert [s.ticket for s in engine.rows] == [dropped, kept]
    assert engine.cancel(dropped) and [s.ticket for s in engine.rows] == [kept]  # the last row moved into row 0
    queued = engine.submit(requests[1])
    assert engine.cancel(queued) and not engine.queue
    answers = {}
    while not engine.idle:
        answers.update(engine.step())
    assert list(answers) == [kept] and answers[kept].tokens == alone[2].tokens
    assert not engine.cancel(kept) and engine.cache is None


@pytest.mark.slow
def test_stop_ends_a_running_request_with_its_answer_so_far(rag, requests, alone):
    _fresh_store(rag, requests)
    engine = AnswerEngine(rag, max_batch=2)
    ticket = engine.submit(requests[2])
    engine.step(), engine.step(), engine.step()
    answer = engine.stop(ticket)
    assert answer.tokens == alone[2].tokens[:3] and answer.chunk_ids == alone[2].chunk_ids
    assert engine.idle and engine.cache is None


@pytest.mark.slow
def test_temperature_per_request_samples_as_the_request_would_alone(rag, requests, alone, monkeypatch):
    _fresh_store(rag, requests)
    engine = AnswerEngine(rag, max_batch=2)
    greedy, hot = engine.run([requests[2], dataclasses.replace(requests[2], temperature=1.5)])
    monkeypatch.setattr(rag, "sampling", dataclasses.replace(rag.sampling, temperature=1.5))
    assert greedy.tokens == alone[2].tokens and engine.peak_rows == 2
    assert hot.tokens == rag.answer(requests[2].question, requests[2].chunks, mode="full").tokens != greedy.tokens


@pytest.mark.slow
def test_memory_budget_bounds_the_batch_and_keeps_answers(rag, requests, alone):
    _fresh_store(rag, requests)
    prompt_rows = max(sum(len(s.token_ids) for s in rag.prompt.segments(r.question, r.chunks)) for r in requests)
    engine = AnswerEngine(rag, max_batch=4)
    budget = 2 * (prompt_rows + rag.max_new_tokens) * engine.slot_bytes  # two of the longest prompts
    engine.max_kv_bytes = budget
    batched = engine.run(requests)
    assert engine.peak_kv_bytes <= budget and engine.peak_rows == 2
    assert [a.tokens for a in batched] == [a.tokens for a in alone]


@pytest.mark.slow
def test_a_shared_chunk_is_fetched_once_per_batch(rag, requests, monkeypatch):
    _fresh_store(rag, requests)
    looked_up: list = []
    get = rag.store.get
    monkeypatch.setattr(rag.store, "get", lambda key, **kw: looked_up.append(key) or get(key, **kw))
    shared = requests[0].chunks[0]
    pair = [dataclasses.replace(requests[0], mode="naive"), Request("Who wrote it?", [shared], "naive")]
    engine = AnswerEngine(rag, max_batch=2)
    engine.run(pair)
    key = rag.keys.shared(shared.token_ids)
    assert looked_up.count(key) == 1
    assert not engine.held.entries  # released once the group was prefilled


@pytest.mark.slow
def test_pipeline_ask_many_answers_like_ask_and_streams_by_question(tmp_path):
    from ragkit.pipeline import Pipeline
    from tests.test_pipeline import make_beir, make_config

    make_beir(tmp_path / "data")
    config = make_config(tmp_path, extra='[generator]\nmax_new_tokens = 4\nchunks = 2\n'
                                         '[cache]\nmode = "full"\ndir = ""\n')
    pipe = Pipeline.from_config(config, progress=False)
    questions = [q.text for q in pipe.queries()[:3]]
    streamed: dict[int, str] = {}
    many = pipe.ask_many(questions, on_token=lambda i, text: streamed.update({i: streamed.get(i, "") + text}),
                         batch_size=2)
    single = [pipe.ask(q) for q in questions]
    assert [(a.text, a.tokens, a.chunk_ids) for a in many] == [(a.text, a.tokens, a.chunk_ids) for a in single]
    assert {i: text.strip() for i, text in streamed.items() if text.strip()} == \
        {i: a.text for i, a in enumerate(single) if a.text}


@pytest.mark.parametrize("sizes, message", [("8,x", "expected comma-separated integers"),
                                            ("0,4", "batch sizes must be at least 1")])
def test_bench_batch_refuses_bad_batch_sizes_before_loading_a_model(sizes, message):
    from typer.testing import CliRunner

    from ragkit.cli import app

    result = CliRunner().invoke(app, ["bench", "batch", "--batch-sizes", sizes])
    assert result.exit_code == 2 and message in result.output
