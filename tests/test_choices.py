"""Closed-form answers: choice log-likelihoods against a plain transformers forward, and bad choices."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from generators.choices import choice_ids, pick
from ragkit.config import CacheConfig, GeneratorConfig
from ragkit.errors import InputError
from ragkit.types import Chunk, token_hash
from tests.conftest import tiny_llama

torch.set_num_threads(1)

TEXTS = ["Paris is the capital of France and the Eiffel Tower stands there.",
         "Rome is the capital of Italy; the Colosseum is in Rome.",
         "The Nile flows north into the Mediterranean Sea."]
# "no" is a prefix of "no way" (token for token); lengths 1, 2, 3 and 1 exercise the padding
CHOICES = ["no", "no way", "yes it is", "maybe"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from generators.rag import RagGenerator

    folder = tiny_llama(tmp_path_factory.mktemp("tiny"), layers=3)
    generator = {**dataclasses.asdict(GeneratorConfig()), "model": str(folder), "device": "cpu", "dtype": "float32",
                 "choices": ["yes", "no"]}
    rag = RagGenerator(generator, {**dataclasses.asdict(CacheConfig()), "dir": ""})
    chunks = []
    for i, text in enumerate(TEXTS):
        ids = rag.prompt.chunk_ids(text)
        chunks.append(Chunk(id=f"d{i}#0", doc_id=f"d{i}", text=text, token_ids=ids, span=(0, len(text)),
                            content_hash=token_hash(ids)))
    rag.warm(chunks, progress=False)  # every chunk stored alone: blend finds inexact entries and recomputes
    return rag, chunks, LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _reference_logliks(hf, prompt: list[int], choices: list[tuple[int, ...]]) -> list[float]:
    """Plain transformers: one forward over prompt + choice per choice, summing each choice token's log-prob."""
    out = []
    for ids in choices:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + list(ids)])).logits[0].float()
        logprobs = torch.log_softmax(logits, -1)
        out.append(sum(float(logprobs[len(prompt) - 1 + t, token]) for t, token in enumerate(ids)))
    return out


@pytest.mark.parametrize("mode", ["full", "blend"])
def test_choice_logliks_equal_a_plain_transformers_forward(tiny, mode):
    rag, chunks, hf = tiny
    question = "What is the capital of France?"
    ids = choice_ids(rag.prompt.ids, CHOICES, "test")
    assert ids[1][: len(ids[0])] == ids[0] and len(ids[1]) > len(ids[0])  # a prefix, token for token
    prompt = [t for seg in rag.prompt.segments(question, chunks[::-1]) for t in seg.token_ids]
    expected = _reference_logliks(hf, prompt, ids)
    saved = rag.settings
    rag.settings = dataclasses.replace(saved, ratio=1.0)  # blend recomputes every reused row: exact
    try:
        answer = rag.choose(question, chunks[::-1], CHOICES, mode=mode)
    finally:
        rag.settings = saved
    got = [c.loglik for c in answer.scored.choices]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4, (got, expected)
    assert answer.cache_hits == (0 if mode == "full" else 3)
    assert answer.text == CHOICES[max(range(4), key=lambda n: expected[n])]
    assert [c.token_ids for c in answer.scored.choices] == ids
    # a prefix never scores below its extension in total log-likelihood; per token it may
    assert got[0] >= got[1]


def test_single_token_choices_read_the_prefill_logits_and_norms_rank_by_length(tiny):
    rag, chunks, hf = tiny
    question = "Is Rome in Italy?"
    answer = rag.choose(question, chunks, mode="naive")  # the configured yes/no
    prompt_logits, *_ = rag.prefill(question, chunks, mode="naive")
    logprobs = torch.log_softmax(prompt_logits, -1)
    expected = [float(logprobs[i[0]]) for i in choice_ids(rag.prompt.ids, ["yes", "no"], "test")]
    assert [c.loglik for c in answer.scored.choices] == pytest.approx(expected, abs=1e-6)
    assert answer.tokens == list(answer.scored.choices[answer.scored.best].token_ids)

    ids = [(1,), (1, 2), (3, 4, 5)]
    assert pick(["a", "ab", "abc"], ids, [-1.0, -1.7, -2.4], "none").best == 0
    assert pick(["a", "ab", "abc"], ids, [-1.0, -1.7, -2.4], "tokens").best == 2  # -1, -0.85, -0.8 per token
    assert pick(["a", "abcdef", "ab"], ids, [-1.0, -1.7, -2.4], "chars").best == 1  # -1, -0.28, -1.2 per character
    assert pick(["x", "y"], [(1,), (2,)], [-1.0, -1.0]).best == 0  # ties: the first


def test_empty_choices_and_choices_that_tokenise_to_nothing_are_refused(tiny):
    rag, chunks, _hf = tiny
    with pytest.raises(InputError, match="the choice list is empty"):
        choice_ids(rag.prompt.ids, [], "q1")
    with pytest.raises(InputError, match=r"choice 1 \(''\) tokenises to nothing"):
        rag.choose("q?", chunks[:1], ["yes", ""], mode="full")
