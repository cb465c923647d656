"""Closed-form questions in an answer run (ragkit.answering): which choices a query has, which gold
answers they can score, and what answers.jsonl records of a closed-form answer and its reference.

A query is closed-form when it has its own `choices` (dataset field or metadata.choices) or the config
sets generator.choices. Its answer is the choice with the best log-likelihood after the prompt
(generators.choices). A gold answer that is none of the choices could never be matched: such a query
is answered and recorded, counted as `gold_outside_choices`, and not scored.
"""

from __future__ import annotations

from typing import Any

from eval.answers import normalize_answer
from generators.choices import choice_ids
from ragkit.types import Chunk, Query


def query_choices(query: Query, default: list[str]) -> list[str]:
    """The query's own choices, else the configured ones (empty: free generation)."""
    return list(query.choices or default)


def gold_choice(golds: list[str] | tuple[str, ...], choices: list[str]) -> int | None:
    """Index of the choice some gold answer names (compared normalised, as EM compares), or None."""
    wanted = {normalize_answer(g) for g in golds}
    return next((n for n, choice in enumerate(choices) if normalize_answer(choice) in wanted), None)


def check_choices(tokenize, queries: list[Query], default: list[str], where: str) -> set[str]:
    """Tokenise every closed-form query's choices before the first answer (a choice that tokenises to
    nothing stops the run, naming the query); returns the ids of queries whose gold answers are none of
    their choices."""
    outside = set()
    for query in queries:
        choices = query_choices(query, default)
        if not choices:
            continue
        choice_ids(tokenize, choices, f"{where}: query {query.id!r}")
        if query.answers and gold_choice(query.answers, choices) is None:
            outside.add(query.id)
    return outside


def closed_form(generator, question: str, chunks: list[Chunk], choices: list[str],
                reference: str | None) -> tuple[Any, dict[str, Any]]:
    """The configured mode's ChoiceAnswer and what answers.jsonl adds: every choice's log-likelihood and,
    with a reference mode (answered first, as for free answers), whether it picks the same choice
    (`choice_agreement`) and the largest log-likelihood difference over the choices (`loglik_gap`)."""
    ref = None if reference is None else generator.choose(question, chunks, choices, mode=reference)
    answer = generator.choose(question, chunks, choices)
    fields: dict[str, Any] = {"choice_norm": generator.choice_norm, "choices": [
        {"choice": c.text, "loglik": c.loglik, "score": c.score, "tokens": len(c.token_ids)}
        for c in answer.scored.choices]}
    if ref is not None:
        fields.update({
            "reference_mode": reference, "reference_answer": ref.text, "reference_ttft_s": ref.ttft_s,
            "reference_logliks": [c.loglik for c in ref.scored.choices],
            "choice_agreement": float(ref.scored.best == answer.scored.best),
            "loglik_gap": max(abs(a.loglik - b.loglik) for a, b in zip(answer.scored.choices, ref.scored.choices))})
    return answer, fields
