"""Listwise LLM reranking (RankGPT): the LLM orders a window of numbered passages.

Windows of `window` passages slide from the bottom of the top `depth` up by `step`, so that a relevant
passage found low can climb to the top in one pass. The LLM answers with identifiers such as
"[3] > [1] > [2]"; a reply that is not a permutation is repaired, never fatal: unknown and repeated
identifiers are dropped and the missing ones follow in their previous order.
"""

from __future__ import annotations

import re

from ragkit.types import Chunk

SYSTEM = "You are RankGPT, an assistant that ranks passages by their relevance to a query."


def repair(reply: str, n: int) -> tuple[list[int], bool]:
    """(a permutation of range(n) read from the reply, whether the reply needed repair)."""
    seen: list[int] = []
    wanted = 0
    for number in re.findall(r"\d+", reply):
        index = int(number) - 1
        wanted += 1
        if 0 <= index < n and index not in seen:
            seen.append(index)
    order = seen + [i for i in range(n) if i not in seen]
    return order, not (wanted == n == len(seen))


def window_prompt(query: str, passages: list[str]) -> list[dict[str, str]]:
    listing = "\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages))
    user = (f"I will give you {len(passages)} passages, each marked by an identifier [i]. Rank them by relevance "
            f"to the query: {query}\n\n{listing}\n\nQuery: {query}\nAnswer with the identifiers only, most "
            f"relevant first, in the form [2] > [1] > [3], and nothing else.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


class ListwiseReranker:
    """Scores (rank-based) from sliding-window orderings by `llm` (a generators.llm.LLM)."""

    def __init__(self, llm, window: int = 20, step: int = 10, max_tokens: int = 128, chars: int = 600):
        self.llm, self.window, self.step, self.max_tokens, self.chars = llm, window, step, max_tokens, chars
        self.windows = self.repaired = 0

    def order(self, query: str, chunks: list[Chunk]) -> list[int]:
        """Indices of `chunks`, most relevant first."""
        order = list(range(len(chunks)))
        end = len(order)
        while end > 1:  # a single passage has no order to ask for
            start = max(0, end - self.window)
            texts = [_passage(chunks[i], self.chars) for i in order[start:end]]
            reply = self.llm.complete(window_prompt(query, texts), self.max_tokens)
            permutation, repaired = repair(reply, end - start)
            self.windows += 1
            self.repaired += int(repaired)
            order[start:end] = [order[start + i] for i in permutation]
            if start == 0:
                break
            end -= self.step
        return order

    def score(self, query: str, chunks: list[Chunk]) -> list[float]:
        scores = [0.0] * len(chunks)
        for rank, index in enumerate(self.order(query, chunks)):
            scores[index] = float(len(chunks) - rank)
        return scores


def _passage(chunk: Chunk, chars: int) -> str:
    text = f"{chunk.title}: {chunk.text}" if chunk.title else chunk.text
    return " ".join(text.split())[:chars]
