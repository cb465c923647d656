"""Query expansion with an LLM: the text each query is retrieved with (rerankers keep the original).

    reason     the query followed by the LLM's reasoning about it (BRIGHT's reasoning-query protocol:
               what the question asks, which concepts and documents would help)
    hyde       a hypothetical passage answering the query, alone (HyDE)
    query2doc  the query followed by that passage (query2doc)

Prompts go through `complete_many`, so a cached LLM (generators.llm.CachedLLM) answers a rerun from
disk and an endpoint works through them concurrently.
"""

from __future__ import annotations

KINDS = ("reason", "hyde", "query2doc")

_INSTRUCTIONS = {
    "reason": ("Identify the essential problem in the post. Think step by step about what information and "
               "which concepts would be relevant to address it. Write your reasoning in a short paragraph."),
    "hyde": "Write a short passage that answers the question.",
    "query2doc": "Write a short passage that answers the question.",
}


def expansion_prompt(kind: str, query: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{_INSTRUCTIONS[kind]}\n\n{query}"}]


def expand(llm, kind: str, queries: list[str], max_tokens: int) -> list[str]:
    """The retrieval text of each query under `kind`."""
    generated = llm.complete_many([expansion_prompt(kind, q) for q in queries], max_tokens)
    if kind == "hyde":
        return [text or query for query, text in zip(queries, generated)]
    return [f"{query}\n{text}" for query, text in zip(queries, generated)]
