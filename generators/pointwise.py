"""Pointwise LLM reranking on cached chunk KV (monoT5 / RankLLaMA style, with the local decoder).

The prompt puts the passage first, right behind the shared prompt head, and the question after it:

    head (chat template, system prompt, "Documents:\\n")  | chunk tokens | "\\n\\nQuestion: q\\nRelevant?" + reply header

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

ASK = "Relevant?"  # short: every token here is computed per candidate (the reply header follows)
YES, NO = ("yes", "Yes", " yes", " Yes"), ("no", "No", " no", " No")
CACHED, UNCACHED = "prefix", "full"  # reuse modes: exact chunk entries, or everything computed


@dataclass
class PointwiseStats:
    prompts: int = 0
    computed_rows: int = 0
    seconds: float = 0.0


class PointwiseScorer:
    """Relevance scores of (question, chunk) pairs from a generators.rag.RagGenerator."""

    def __init__(self, rag, cached: bool = True, title: bool = False, batch_size: int = 32):
        self.rag, self.title, self.batch_size = rag, title, batch_size
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
        """One score per chunk, in order; higher means more relevant. The prompts run `batch_size` at a
        time in one forward (chunk_cache.batch): with reuse only their question rows, without the whole."""
        start = time.perf_counter()
        logits, rows = self.rag.reuse.last_logits([self.segments(question, c) for c in chunks], self.settings,
                                                  self.batch_size)
        scores = [float(x[self.yes].logsumexp(0) - x[self.no].logsumexp(0)) for x in logits]
        self.stats.seconds += time.perf_counter() - start
        self.stats.prompts += len(chunks)
        self.stats.computed_rows += sum(rows)
        return scores


def _first_ids(prompt, words: tuple[str, ...]) -> torch.Tensor:
    """The first token of each spelling of a reply word (deduplicated)."""
    ids = sorted({prompt.ids(word)[0] for word in words if prompt.ids(word)})
    return torch.tensor(ids)
