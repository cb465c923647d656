"""Primed entries: each chunk also stored as computed behind a stand-in passage of its own corpus.

A chunk warmed behind the shared head alone is exact where it comes first and off everywhere else in
the same way: its rows never saw another passage. In a RAG prompt every later chunk sits behind passages
it was not computed behind, and much of what that changes in its K/V is not what those passages say but
that there are passages at all (attention no longer pours into the head; the chunk reads as one
document of several). So a warm with a primer stores each chunk twice (FusionRAG's offline enrichment,
with one neighbour for all): behind the head (`KeyScheme.shared`, exact when the chunk comes first) and
behind the head, the primer and a separator, as a prompt lays them out (an exact key of that prefix).
A reused chunk that sits behind passages takes the variant computed behind a passage
(ChunkReuse._best_variant); the recompute selectors then fix the rest.

The primers are passages of the corpus itself, chosen by length alone (`choose_primers`; how many is
`cache.primer_passages`, default 1): the stand-in has to be in-domain, which passage hardly matters.
Measured on MuSiQue dev questions q0-q19 (5 passages, SmolLM2-135M), mean first-token KL against full
prefill when chunks 2-5 reuse entries computed behind:

    the head alone                                 naive 0.186   query@0.25 0.040
    another MuSiQue passage (one per question)     naive 0.078   query@0.2  0.025
    one fixed MuSiQue passage                      naive 0.082   query@0.2  0.031
    a written generic paragraph (not in corpus)    naive 0.104   query@0.2  0.038

Two primer passages (closer to where chunks 3-5 sit) were no better than one on the same questions
(`ragkit bench answer`, query@0.2: agreement 0.950 both, KL1 0.032 vs 0.029). Held out (test q50-q69):
query@0.2 agreement 0.931 -> 0.944 and KL1 0.036 -> 0.022 with primed entries (BENCHMARKS.md).

A primed warm costs about twice a plain one (the primer's rows are computed once and reused exactly),
and stores twice the bytes. Lookups read any variant, so a cache written before primed entries, or
primed by another corpus's primer, is still read (its chunks simply have no, or another, primed variant).
"""

from __future__ import annotations

from typing import Iterable

from ragkit.types import Chunk


def choose_primers(chunks: Iterable[Chunk], count: int) -> list[Chunk]:
    """The `count` corpus chunks nearest the median token length (ties: by id), shortest first: typical passages
    of the corpus, the same for every warm of the same corpus, independent of which questions are asked."""
    ranked = sorted(chunks, key=lambda c: (len(c.token_ids), c.id))
    start = max(0, (len(ranked) - 1) // 2 - (count - 1) // 2)
    return ranked[start:start + count] if count > 0 else []
