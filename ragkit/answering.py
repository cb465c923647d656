"""Answer evaluation: answer every query from its retrieved chunks and score the answers.

`Pipeline.evaluate` calls `evaluate_answers` when the config has a [generator] section or
`ragkit eval --answers` is given. Per query it takes the top `generator.chunks` chunks, answers
with the configured cache mode through `Pipeline.generator`, and records what answers.jsonl
holds. With a reference mode (`--reference full`) the same prompt is also answered under that
mode; the configured mode is then teacher-forced on the reference's tokens (plus a stop token
when the reference stopped early) for token agreement, and the first-token logits of both give
KL(reference || mode). A closed-form query (its own `choices`, or generator.choices) is answered by the
best-scored choice instead, and compared with the reference by choice agreement and log-likelihood gap
(ragkit.choices). With generator.backend = "openai" the prompts go whole, as chat messages, to the [llm]
endpoint instead (mode "openai-full-prompt": no chunk KV reuse, no TTFT). Everything is checked before
the first answer (metrics, gold answers,
model, prompt lengths), and nothing is written here: eval.runs.write_run publishes the run
folder, answers included, as one step, so a run killed midway leaves no half-written folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from eval.answers import check_metrics
from eval.generation import first_token_kl, merge_scores, score_generation
from ragkit.choices import check_choices, closed_form, query_choices
from ragkit.errors import InputError
from ragkit.types import Chunk, Query

# Chat-template head, "Documents:", separators and the reply header around question and chunks:
# ~40 tokens for SmolLM2's template; the margin covers longer templates and system prompts.
PROMPT_OVERHEAD_TOKENS = 96
RETRIEVE_BATCH = 64
ENDPOINT_MODE = "openai-full-prompt"  # generator.backend = "openai": whole prompts on an endpoint, no KV reuse


@dataclass
class AnswerEval:
    """What an answer run adds to a retrieval run's results and folder."""

    aggregate: dict[str, float]
    per_query: dict[str, dict[str, float]]
    timings: dict[str, float]
    counts: dict[str, int]
    records: list[dict[str, Any]] = field(default_factory=list)


def gold_answers(queries: list[Query], where: Path) -> dict[str, list[str]]:
    """Gold answers by query id; none at all is an error, since nothing could be scored."""
    golds = {q.id: list(q.answers) for q in queries if q.answers}
    if not golds:
        raise InputError(where, f"none of the {len(queries)} queries has gold answers, so answers cannot be scored",
                         hint="give queries an `answers` field (a string or a list of strings, e.g. \"yes\"), or "
                              "evaluate retrieval only: drop the [generator] section / --answers")
    return golds


def model_context(model_folder: Path) -> int | None:
    """The model's longest position (config.json max_position_embeddings), when it says."""
    try:
        value = json.loads((model_folder / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def check_prompt_lengths(queries: list[Query], contexts: list[list[Chunk]], tokenizer, system_prompt: str,
                         max_new_tokens: int, limit: int | None, where: Path) -> None:
    """Refuse, naming the query, a prompt that cannot fit the model's context with its answer."""
    if limit is None:
        return
    fixed = len(tokenizer(system_prompt, add_special_tokens=False)["input_ids"]) + PROMPT_OVERHEAD_TOKENS
    for query, chunks in zip(queries, contexts):
        question = len(tokenizer(query.text, add_special_tokens=False)["input_ids"])
        context = sum(len(c.token_ids) for c in chunks)
        titles = sum(len(tokenizer(f"Title: {c.title}\n", add_special_tokens=False)["input_ids"])
                     for c in chunks if c.title)
        needed = fixed + question + context + titles + max_new_tokens
        if needed > limit:
            raise InputError(where, f"query {query.id!r}: the prompt needs about {needed} tokens (question "
                             f"{question}, {len(chunks)} chunks {context + titles}, answer {max_new_tokens}), more "
                             f"than the model's context of {limit} (max_position_embeddings)",
                             hint="shorten the question, or lower generator.chunks, chunking.size or "
                                  "generator.max_new_tokens")


def evaluate_answers(pipe, queries: list[Query], reference: str | None = None) -> AnswerEval:
    """Answer and score every query (see the module docstring); `pipe` is the Pipeline."""
    from generators.weights import load_tokenizer, resolve_model_dir

    cfg = pipe.config
    metrics = check_metrics(cfg.eval.answer_metrics)
    golds = gold_answers(queries, cfg.dataset_path())
    endpoint = cfg.generator.backend == "openai"
    if endpoint and (reference is not None or cfg.generator.choices or any(q.choices for q in queries)):
        raise InputError(cfg.dataset_path(), "--reference and closed-form choices score the local generator; "
                         "generator.backend = \"openai\" answers with full prompts on the endpoint")
    generator = None if endpoint else pipe.generator  # a missing model folder stops here, before any answer
    tokenizer = load_tokenizer(cfg.generator.model)
    contexts = []
    for start in range(0, len(queries), RETRIEVE_BATCH):
        batch = queries[start:start + RETRIEVE_BATCH]
        for hits in pipe.retrieve_batch([q.text for q in batch], cfg.generator.chunks):
            contexts.append([pipe.chunk(h.id) for h in hits])
    check_prompt_lengths(queries, contexts, tokenizer, cfg.generator.system_prompt, cfg.generator.max_new_tokens,
                         model_context(resolve_model_dir(cfg.generator.model)), cfg.dataset_path())
    if endpoint:
        return _endpoint_answers(pipe, queries, contexts, golds, metrics)
    outside = check_choices(generator.prompt.ids, queries, generator.choices, str(cfg.dataset_path()))
    golds = {qid: answers for qid, answers in golds.items() if qid not in outside}  # counted, not scored

    records, answer_s = [], 0.0
    bar = tqdm(list(zip(queries, contexts)), desc=f"answering ({cfg.cache.mode})", unit="q", dynamic_ncols=True,
               disable=not pipe.progress)
    for query, chunks in bar:
        choices = query_choices(query, generator.choices)
        if choices:  # closed form: the best-scored choice (ragkit.choices)
            answer, compared = closed_form(generator, query.text, chunks, choices, reference)
        else:
            compared = {} if reference is None else _against_reference(
                generator, query.text, chunks, reference, cfg.cache.mode)
            answer = generator.answer(query.text, chunks)
        answer_s += answer.total_s
        records.append({"query_id": query.id, "answer": answer.text, "golds": list(query.answers),
                        "chunk_ids": answer.chunk_ids, "mode": answer.mode, "ttft_s": answer.ttft_s,
                        "total_s": answer.total_s, "context_tokens": answer.context_tokens,
                        "recomputed_tokens": answer.recomputed_tokens, "recompute_share": answer.recompute_share,
                        "cache_hits": answer.cache_hits, **compared})
        bar.set_postfix(ttft=f"{answer.ttft_s:.2f}s", hits=f"{answer.cache_hits}/{len(chunks)}")
    scored = _scores(records, golds, metrics, reference, answer_s, len(queries))
    if outside or any(query_choices(q, generator.choices) for q in queries):
        scored.counts["gold_outside_choices"] = len(outside)
    return scored


def _endpoint_answers(pipe, queries: list[Query], contexts: list[list[Chunk]], golds: dict[str, list[str]],
                      metrics: list[str]) -> AnswerEval:
    """generator.backend = "openai": every RAG prompt is sent whole to the [llm] endpoint, its chunks as
    text (no chunk KV reuse: mode "openai-full-prompt"); up to llm.concurrency requests at a time."""
    from generators.endpoint import EndpointLLM
    from generators.prompt import rag_messages

    cfg, llm_cfg = pipe.config, pipe.config.llm
    llm = EndpointLLM(llm_cfg.base_url, llm_cfg.model, llm_cfg.api_key_env, llm_cfg.concurrency, llm_cfg.timeout,
                      llm_cfg.retries, whole_prompt=True)
    prompts = [rag_messages(cfg.generator.system_prompt, q.text, chunks) for q, chunks in zip(queries, contexts)]
    start = time.perf_counter()
    try:
        replies = llm.complete_many(prompts, cfg.generator.max_new_tokens, cfg.generator.temperature)
    finally:
        llm.close()
    answer_s = time.perf_counter() - start
    records = [{"query_id": q.id, "answer": reply.strip(), "golds": golds.get(q.id, []),
                "chunk_ids": [c.id for c in chunks], "mode": ENDPOINT_MODE, "endpoint": llm.url}
               for q, chunks, reply in zip(queries, contexts, replies)]
    result = _scores(records, golds, metrics, None, answer_s, len(queries))
    result.counts["endpoint_requests"] = llm.requests
    return result


def _against_reference(generator, question: str, chunks: list[Chunk], reference: str, mode: str) -> dict[str, Any]:
    """Answer under the reference mode, then teacher-force both modes on its tokens. Runs before the
    configured mode answers, since forcing stores nothing and answering stores the chunks it computed
    (full prefill stores none; another reference mode may, and the configured mode then finds them)."""
    ref = generator.answer(question, chunks, mode=reference, keep_logits=True)
    tokens = generator.forced_reference(ref.tokens)
    ref_logits = ref.first_logits
    logits, predicted = generator.teacher_force(question, chunks, tokens, mode=mode)
    agreement = sum(int(a == b) for a, b in zip(predicted, tokens)) / max(1, len(tokens))
    return {"reference_mode": reference, "reference_answer": ref.text, "reference_ttft_s": ref.ttft_s,
            "agreement": agreement, "kl": first_token_kl(ref_logits.float().cpu().numpy(),
                                                          logits.float().cpu().numpy())}


def _scores(records: list[dict[str, Any]], golds: dict[str, list[str]], metrics: list[str], reference: str | None,
            answer_s: float, questions: int) -> AnswerEval:
    by_id = {r["query_id"]: {**r, "text": r["answer"]} for r in records}
    aggregate, per_query = score_generation(by_id, golds, metrics)
    if reference is not None:  # the reference's own answers and TTFT, as "<mode>_<metric>"
        ref_records = {qid: {"text": r["reference_answer"], "ttft_s": r["reference_ttft_s"]}
                       for qid, r in by_id.items()}
        ref_aggregate, ref_per_query = score_generation(ref_records, golds, metrics)
        aggregate, per_query = merge_scores(
            (aggregate, per_query),
            ({f"{reference}_{k}": v for k, v in ref_aggregate.items()},
             {q: {f"{reference}_{k}": v for k, v in values.items()} for q, values in ref_per_query.items()}))
    timings = {"answer_s": round(answer_s, 3),
               "questions_per_s": round(questions / answer_s, 4) if answer_s > 0 else None}
    counts = {"answered_queries": questions, "queries_with_gold_answers": sum(1 for r in records
                                                                           if r["query_id"] in golds),
              "queries_without_gold_answers": sum(1 for r in records if not r["golds"])}
    return AnswerEval(aggregate, per_query, timings, counts, records)
