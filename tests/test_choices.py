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


def test_choice_ratio_is_the_blend_share_closed_form_scoring_prefills_with(tiny):
    """cache.choice_ratio = 1.0 makes blend's choices exact at the default ratio; without it they are not."""
    rag, chunks, hf = tiny
    chunks = [chunks[2], chunks[0], chunks[1]]  # an order no other test prefills in full (and so stores exactly)
    question = "Is the Colosseum in Paris?"
    ids = choice_ids(rag.prompt.ids, CHOICES, "test")
    prompt = [t for seg in rag.prompt.segments(question, chunks) for t in seg.token_ids]
    expected = _reference_logliks(hf, prompt, ids)
    saved = rag.settings
    rag.settings = dataclasses.replace(saved, full_layers=0)  # selection at layer 0: reuse shows in 3 layers
    try:
        assert rag.settings.ratio < 1.0 and rag.choice_ratio == 0.0 and rag.choice_settings() == {}
        default = [c.loglik for c in rag.choose(question, chunks, CHOICES, mode="blend").scored.choices]
        rag.choice_ratio = 1.0
        assert rag.choice_settings() == {"ratio": 1.0}
        answer = rag.choose(question, chunks, CHOICES, mode="blend")
    finally:
        rag.settings, rag.choice_ratio = saved, 0.0
    got = [c.loglik for c in answer.scored.choices]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4, (got, expected)
    assert max(abs(a - b) for a, b in zip(default, expected)) > 1e-3  # reuse at 0.15 is approximate
    # every inexact row recomputed (the first chunk sits behind the head as stored: exact, reused as it is)
    assert answer.cache_hits == 3 and answer.recomputed_tokens == answer.context_tokens - len(chunks[0].token_ids)


@pytest.mark.parametrize("value, message", [("1.5", "'cache.choice_ratio': must be in [0, 1], got 1.5"),
                                            ("-0.1", "'cache.choice_ratio'")])
def test_choice_ratio_outside_0_1_is_a_config_error(tmp_path, value, message):
    from ragkit.config import load_config
    from ragkit.errors import ConfigError

    config = tmp_path / "c.toml"
    config.write_text(f'name = "c"\n[dataset]\npath = "{tmp_path}"\n[cache]\nchoice_ratio = {value}\n')
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    assert message in str(refused.value)


def test_empty_choices_and_choices_that_tokenise_to_nothing_are_refused(tiny):
    rag, chunks, _hf = tiny
    with pytest.raises(InputError, match="the choice list is empty"):
        choice_ids(rag.prompt.ids, [], "q1")
    with pytest.raises(InputError, match=r"choice 1 \(''\) tokenises to nothing"):
        rag.choose("q?", chunks[:1], ["yes", ""], mode="full")


# --- `ragkit eval` with closed-form answers --------------------------------------------------------

QUERIES = [
    {"_id": "q1", "text": "Is Paris the capital of France?", "answers": ["yes"]},
    {"_id": "q2", "text": "Is Rome the capital of France?", "answers": "No"},  # matched normalised
    {"_id": "q3", "text": "Which river flows into the Mediterranean?", "answers": ["B"],
     "metadata": {"choices": ["A", "B", "C"]}},  # its own choices win over generator.choices
    {"_id": "q4", "text": "Does the Nile flow south?", "answers": ["unclear"]},  # outside yes/no: not scored
]


def _eval_setup(root, queries, choices='["yes", "no"]', mode="blend"):
    import json

    data = root / "data"
    (data / "qrels").mkdir(parents=True)
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(TEXTS)))
    (data / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q['_id']}\td{n % 3}\t1\n" for n, q in enumerate(queries)))
    model = tiny_llama(root / "model")
    config = root / "closed.toml"
    config.write_text(f"""name = "closed"
[dataset]
format = "beir"
path = "{data}"
[chunking]
size = 48
overlap = 8
[retrieval]
k = 10
index_dir = "{root / 'indexes'}"
[generator]
model = "{model}"
device = "cpu"
dtype = "float32"
chunks = 2
choices = {choices}
[cache]
mode = "{mode}"
dir = "{root / 'kv'}"
[eval]
metrics = ["ndcg@10"]
answer_metrics = ["em", "accuracy"]
runs_dir = "{root / 'runs'}"
""")
    return config


def test_eval_records_choice_logliks_and_agreement_with_full(tmp_path):
    import json

    from typer.testing import CliRunner

    from ragkit.cli import app

    config = _eval_setup(tmp_path, QUERIES)
    result = CliRunner().invoke(app, ["eval", str(config), "--reference", "full", "-q"])
    assert result.exit_code == 0, result.output
    assert "1 with gold answers outside their choices (not scored)" in result.output
    assert "choice agreement" in result.output and "log-likelihood gap" in result.output
    run_dir = tmp_path / "runs" / "closed"
    results = json.loads((run_dir / "results.json").read_text())
    records = {r["query_id"]: r for r in map(json.loads, (run_dir / "answers.jsonl").read_text().splitlines())}
    counts = results["counts"]
    assert counts["gold_outside_choices"] == 1 and counts["queries_with_gold_answers"] == 3
    assert counts["queries_without_gold_answers"] == 0 and records["q4"]["golds"] == ["unclear"]
    assert [c["choice"] for c in records["q3"]["choices"]] == ["A", "B", "C"]
    assert [c["choice"] for c in records["q1"]["choices"]] == ["yes", "no"]
    for record in records.values():  # the answer is the best-scored choice, and full agrees with itself exactly
        best = max(record["choices"], key=lambda c: c["score"])
        assert record["answer"] == best["choice"] and record["choice_norm"] == "none"
        assert record["reference_answer"] in [c["choice"] for c in record["choices"]]
        assert len(record["reference_logliks"]) == len(record["choices"])
        assert record["choice_agreement"] == float(record["reference_answer"] == record["answer"])
        assert record["loglik_gap"] == pytest.approx(max(abs(c["loglik"] - r) for c, r in
                                                         zip(record["choices"], record["reference_logliks"])))
    per_query = results["per_query"]
    assert "em" not in per_query["q4"] and "choice_agreement" in per_query["q4"]  # answered, recorded, not scored
    assert per_query["q2"]["em"] == float(records["q2"]["answer"] == "no")
    assert results["aggregate"]["em"] == pytest.approx(sum(per_query[q]["em"] for q in ("q1", "q2", "q3")) / 3)


@pytest.mark.parametrize("queries, choices, message", [
    ([{"_id": "q1", "text": "Is it?", "answers": ["yes"], "choices": []}], '["yes", "no"]',
     "queries.jsonl:1: field 'choices' is an empty choice list"),
    ([{"_id": "q1", "text": "Is it?", "answers": ["yes"], "metadata": {"choices": ["yes", " "]}}], "[]",
     "queries.jsonl:1: field 'metadata.choices': choice 1 (' ') is empty"),
    (QUERIES[:1], '["yes", ""]', "config key 'generator.choices[1]': is empty"),
    (QUERIES[:1], '["Yes", "yes"]', "config key 'generator.choices[1]': 'yes' is the same answer as choice 0"),
])
def test_bad_choices_exit_2_naming_them(tmp_path, queries, choices, message):
    from typer.testing import CliRunner

    from ragkit.cli import app

    config = _eval_setup(tmp_path, queries, choices)
    result = CliRunner().invoke(app, ["eval", str(config), "-q"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_bench_compares_choices_per_mode_with_free_generation_and_the_majority_class(tiny):
    from ragkit.bench import choices as bench

    rag, chunks, _hf = tiny
    items = [("Is Paris in France?", chunks[:2], ["yes"]), ("Is Rome in France?", chunks[1:], ["no"]),
             ("Is Paris in Spain?", chunks[::2], ["No"]), ("Does the Nile flow south?", chunks[2:], ["unclear"])]
    logged = []
    result = bench.compare(rag, items, ["naive", "blend@0.5"], logged.append)
    assert list(result["modes"]) == ["full", "naive", "blend@0.5"] and len(logged) == 4
    assert result["scored_queries"] == 3 and result["gold_outside_choices"] == 1
    assert result["gold_counts"] == {"yes": 1, "no": 2} and result["majority_class"] == {"answer": "no",
                                                                                          "accuracy": 0.6667}
    full = result["modes"]["full"]
    assert full["choice_agreement_vs_full"] == 1.0 and full["loglik_gap_vs_full"] == 0.0
    assert 0 <= result["decisive_queries"] <= 4
    assert full["choice_agreement_decisive"] == (1.0 if result["decisive_queries"] else None)
    for r in result["modes"].values():
        assert sum(r["picked"].values()) == 4 and r["choice_accuracy"] in (0.0, 0.3333, 0.6667, 1.0)
        assert 0.0 <= r["free_accuracy"] <= 1.0 and r["prefill_plus_score_vs_prefill_p50"] >= 1.0
        assert r["ttft_p50_s"] > 0 and r["score_p50_s"] >= 0
    lines = bench.format_table(result)
    assert [line.split()[0] for line in lines[2:]] == ["full", "naive", "blend@0.5"]


def test_bench_choices_refuses_a_config_without_choices():
    from typer.testing import CliRunner

    from ragkit.cli import app

    result = CliRunner().invoke(app, ["bench", "choices", "configs/musique-rag.toml", "-q"])
    assert result.exit_code == 2 and "sets no generator.choices" in result.output


def test_bench_scores_a_mode_without_a_ratio_at_choice_ratio(tiny):
    from ragkit.bench import choices as bench

    rag, chunks, _hf = tiny
    items = [("Is the Nile in Italy?", [chunks[1], chunks[2], chunks[0]], ["no"])]  # inexact reuse, no title
    saved = rag.settings
    rag.settings = dataclasses.replace(saved, full_layers=0)
    try:
        approximate = bench.compare(rag, items, ["blend", "blend@1.0"], lambda _m: None)["modes"]
        rag.choice_ratio = 1.0
        exact = bench.compare(rag, items, ["blend", "blend@0.15"], lambda _m: None)["modes"]
    finally:
        rag.settings, rag.choice_ratio = saved, 0.0
    assert approximate["blend"]["loglik_gap_vs_full"] >= 5e-4 and approximate["blend@1.0"]["loglik_gap_vs_full"] < 1e-4
    assert exact["blend"]["loglik_gap_vs_full"] < 1e-4  # at choice_ratio 1.0
    assert exact["blend@0.15"]["loglik_gap_vs_full"] == pytest.approx(approximate["blend"]["loglik_gap_vs_full"],
                                                                   abs=1e-4)
