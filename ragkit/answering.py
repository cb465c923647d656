"""Answer evaluation: answer every query from its retrieved chunks and score the answers.

`Pipeline.evaluate` calls `evaluate_answers` when the config has a [generator] section or
`ragkit eval --answers` is given. Per query it takes the top `generator.chunks` chunks and submits
the question to the pipeline's engine under the configured cache mode, in query order (each prompt
is planned after the ones before it stored their chunks, as one at a time), and records what
answers.jsonl holds. With a reference mode (`--reference full`) every prompt is first answered under
that mode; the configured mode's request then teacher-forces the reference's tokens (plus a stop token
when the reference stopped early) from the same prefill as its own answer, for token agreement, and
the first-token logits of both give KL(reference || mode). (A reference mode that stores chunks, unlike
full, has stored all of them before the configured mode answers.) Everything is checked before the
first answer (metrics, gold answers, model, prompt lengths). A closed-form query (its own `choices`, or
generator.choices) is answered by the best-scored choice instead, and compared with the reference by
choice agreement and log-likelihood gap (ragkit.choices). With generator.backend = "openai" the prompts go
whole, as chat messages, to the [llm] endpoint instead (mode "openai-full-prompt": no chunk KV reuse, no
TTFT). Nothing is written here:
eval.runs.write_run publishes the run folder, answers included, as one step, so a run killed midway
leaves no half-written folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from eval.generation import first_token_kl, merge_scores, score_generation
from ragkit.choices import check_choices, closed_form, query_choices
from ragkit.errors import InputError
from ragkit.types import Chunk, Query

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


def check_prompt_lengths(pipe, queries: list[Query], retrieved: list[list[Chunk]], where: Path) -> None:
    """Refuse, naming the query, a prompt that cannot fit the model's context with its answer."""
    for query, chunks in zip(queries, retrieved):
        needed, limit = pipe.prompt_fits(query.text, chunks)
        if needed > limit:
            raise InputError(where, f"query {query.id!r}: the prompt needs {needed} tokens ({len(chunks)} chunks, "
                             f"answer {pipe.config.generator.max_new_tokens}), more than the model's context of "
                             f"{limit} (max_position_embeddings)",
                             hint="shorten the question, or lower generator.chunks, chunking.size or "
                                  "generator.max_new_tokens")


def evaluate_answers(pipe, queries: list[Query], reference: str | None = None) -> AnswerEval:
    """Answer and score every query (see the module docstring); `pipe` is the Pipeline."""
    cfg = pipe.config
    metrics = list(cfg.eval.answer_metrics)  # checked when the config was loaded (ragkit.config)
    golds = gold_answers(queries, cfg.dataset_path())
    endpoint = cfg.generator.backend == "openai"
    if endpoint and (reference is not None or cfg.generator.choices or any(q.choices for q in queries)):
        raise InputError(cfg.dataset_path(), "--reference and closed-form choices score the local generator; "
                         "generator.backend = \"openai\" answers with full prompts on the endpoint")
    retrieved = pipe.chunks_for([q.text for q in queries])
    if endpoint:
        return _endpoint_answers(pipe, queries, retrieved, golds, metrics)
    generator = pipe.generator  # a missing model folder stops here, before any answer
    check_prompt_lengths(pipe, queries, retrieved, cfg.dataset_path())
    outside = check_choices(generator.prompt.ids, queries, generator.choices, str(cfg.dataset_path()))
    golds = {qid: answers for qid, answers in golds.items() if qid not in outside}  # counted, not scored
    closed = {n: query_choices(q, generator.choices) for n, q in enumerate(queries)}
    free = [n for n, choices in closed.items() if not choices]  # through the engine; closed form: ragkit.choices

    references: dict[int, Any] = {}
    if reference is not None and free:
        with _bar(pipe, len(free), f"answering ({reference}, the reference)") as bar:
            answered = pipe.answer([pipe.request(queries[n].text, retrieved[n], mode=reference, keep_logits=True)
                                    for n in free], grouped=False, on_answer=lambda _i, _a: bar.update())
        references = dict(zip(free, answered))
    forced = {n: pipe.generator.forced_reference(ref.tokens) for n, ref in references.items()}
    answers, compared = {}, {n: {} for n in range(len(queries))}
    with _bar(pipe, len(queries), f"answering ({cfg.cache.mode})") as bar:
        def shown(_index: int, answer) -> None:
            bar.set_postfix(ttft=f"{answer.ttft_s:.2f}s", hits=f"{answer.cache_hits}/{len(answer.chunk_ids)}")
            bar.update()

        start = time.perf_counter()
        answered = pipe.answer([pipe.request(queries[n].text, retrieved[n], keep_logits=reference is not None,
                                             forced=forced.get(n)) for n in free], grouped=False, on_answer=shown)
        answers.update(zip(free, answered))
        for n, choices in closed.items():
            if choices:
                answers[n], compared[n] = closed_form(generator, queries[n].text, retrieved[n], choices, reference)
                shown(n, answers[n])
        answer_s = time.perf_counter() - start
    records = []
    for n, query in enumerate(queries):
        answer = answers[n]
        if n in references:
            compared[n] = _against_reference(reference, references[n], answer, forced[n])
        records.append({"query_id": query.id, "answer": answer.text, "golds": list(query.answers),
                        "chunk_ids": answer.chunk_ids, "mode": answer.mode, "ttft_s": answer.ttft_s,
                        "total_s": answer.total_s, "context_tokens": answer.context_tokens,
                        "recomputed_tokens": answer.recomputed_tokens, "recompute_share": answer.recompute_share,
                        "cache_hits": answer.cache_hits, **compared[n]})
    scored = _scores(records, golds, metrics, reference, answer_s, len(queries))
    if outside or any(closed.values()):
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


def _bar(pipe, total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="q", dynamic_ncols=True, disable=not pipe.progress)


def _against_reference(reference: str, ref, answer, forced: list[int]) -> dict[str, Any]:
    """Token agreement of the mode's teacher-forced predictions with the reference's tokens, and
    KL(reference || mode) of the first token."""
    agreement = sum(int(a == b) for a, b in zip(answer.forced, forced)) / max(1, len(forced))
    return {"reference_mode": reference, "reference_answer": ref.text, "reference_ttft_s": ref.ttft_s,
            "agreement": agreement, "kl": first_token_kl(ref.first_logits.float().cpu().numpy(),
                                                          answer.first_logits.float().cpu().numpy())}


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
