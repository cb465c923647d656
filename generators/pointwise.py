"""Pointwise LLM reranking on cached chunk KV (monoT5 / RankLLaMA style, with the local decoder).

The prompt puts the passage first, right behind the shared prompt head, and the question after it:

    head (chat template, system prompt, "Documents:\\n")  | chunk tokens | "\\n\\nQuestion: q\\n" + ASK + reply header

so the passage's rows are exactly the entry `ragkit cache warm` stored for the chunk (its shared key:
the chunk behind the head alone). With reuse (`prefix` mode: exact entries only) a candidate costs the
question's rows; without (`full`) every row is computed. The two give the same logits up to float
rounding, since a reused exact entry holds the rows a full prefill computes. The score is
logsumexp(logit "yes" variants) - logsumexp(logit "no" variants) at the reply's first token. A chunk
not yet cached is computed once and stored, as answering does. With `title` the document's title
goes after the passage (before it, the chunk would no longer sit behind the head it was cached
behind); it is off by default since its rows are computed for every candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from chunk_cache.assembly import CHUNK, HEAD, QUESTION, Segment
from chunk_cache.modes import ReuseSettings
from ragkit.types import Chunk

ASK = "Relevant? Answer yes or no."  # short: every token here is computed per candidate
YES, NO = ("yes", "Yes", " yes", " Yes"), ("no", "No", " no", " No")
CACHED, UNCACHED = "prefix", "full"  # reuse modes: exact chunk entries, or everything computed


@dataclass
class PointwiseStats:
    prompts: int = 0
    computed_rows: int = 0
    seconds: float = 0.0


class PointwiseScorer:
    """Relevance scores of (question, chunk) pairs from a generators.rag.RagGenerator."""

    def __init__(self, rag, cached: bool = True, title: bool = False):
        self.rag, self.title = rag, title
        self.settings = ReuseSettings(mode=CACHED if cached else UNCACHED)
        self.yes = _first_ids(rag.prompt, YES)
        self.no = _first_ids(rag.prompt, NO)
        self.stats = PointwiseStats()

    def segments(self, question: str, chunk: Chunk) -> list[Segment]:
        prompt = self.rag.prompt
        title = f"\n\nTitle: {chunk.title}" if self.title and chunk.title else ""
        tail = f"{title}\n\nQuestion: {question}\n{ASK}{prompt.tail_text}"
        return [Segment(HEAD, prompt.head_ids), Segment(CHUNK, tuple(chunk.token_ids)),
                Segment(QUESTION, tuple(prompt.ids(tail)))]

    def prompt_ids(self, question: str, chunk: Chunk) -> list[int]:
        """The whole prompt's token ids (what a score cache keys on)."""
        return [t for seg in self.segments(question, chunk) for t in seg.token_ids]

    @torch.inference_mode()
    def score(self, question: str, chunks: list[Chunk]) -> list[float]:
        """One score per chunk, in order; higher means more relevant."""
        scores = []
        for chunk in chunks:
            start = time.perf_counter()
            plan, prefilled, layout, cache = self.rag.reuse.prefill(self.segments(question, chunk), self.settings, 1)
            logits = prefilled.logits.float()
            scores.append(float(logits[self.yes].logsumexp(0) - logits[self.no].logsumexp(0)))
            seconds = time.perf_counter() - start
            self.rag.reuse.commit(plan, layout, cache, prefilled, seconds)  # a miss is computed once
            self.stats.prompts += 1
            self.stats.computed_rows += int((~layout.reused).sum())
            self.stats.seconds += seconds
        return scores


def _first_ids(prompt, words: tuple[str, ...]) -> torch.Tensor:
    """The first token of each spelling of a reply word (deduplicated)."""
    ids = sorted({prompt.ids(word)[0] for word in words if prompt.ids(word)})
    return torch.tensor(ids)
