"""Closed-form answers: score each allowed answer by its log-likelihood after the prompt, take the best.

As evaluation harnesses score multiple-choice and yes/no/maybe questions (lm-evaluation-harness's
loglikelihood requests): for a choice with tokens c_1..c_n after prompt p,

    log P(choice | p) = sum_t log softmax(logits(p, c_<t))[c_t]

The first term comes from the prefill's last logits; the others from ONE forward of every choice's
tokens but its last, batched, against the prompt's cache. The prompt's rows are copied once per
choice of two tokens or more (cache rows [B = those choices]), so each choice attends to the prompt
and its own earlier tokens only; choices of one token (yes/no/maybe, A-D) need no forward at all.
The length-normalised score divides by the choice's tokens (`tokens`) or characters (`chars`,
lm-evaluation-harness's acc_norm); `none` keeps the total.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ragkit.errors import InputError

if TYPE_CHECKING:  # config validation reads NORMS without loading torch
    import torch

    from generators.layers import KVCache
    from generators.model import Decoder

# choice_norm -> what a choice's total log-likelihood is divided by
NORMS = {"none": lambda ids, text: 1, "tokens": lambda ids, text: len(ids),
         "chars": lambda ids, text: max(1, len(text))}


@dataclass
class Choice:
    text: str
    token_ids: tuple[int, ...]
    loglik: float  # total log-likelihood after the prompt, nats
    score: float  # what the argmax compares: loglik, per token or per character (`choice_norm`)


@dataclass
class Scored:
    choices: list[Choice] = field(default_factory=list)
    best: int = 0  # index of the chosen one

    @property
    def text(self) -> str:
        return self.choices[self.best].text


def choice_ids(tokenize, choices: list[str], where: str) -> list[tuple[int, ...]]:
    """Each choice's token ids (tokenised alone, as the reply's first tokens); an empty list or a choice
    that tokenises to nothing is an InputError naming `where` and the choice."""
    if not choices:
        raise InputError(where, "the choice list is empty", hint="give at least two choices, e.g. [\"yes\", \"no\"]")
    ids = []
    for n, text in enumerate(choices):
        tokens = tuple(tokenize(text))
        if not tokens:
            raise InputError(where, f"choice {n} ({text!r}) tokenises to nothing", hint="drop it or give it text")
        ids.append(tokens)
    return ids


def choice_logliks(model: Decoder, cache: KVCache, logits: torch.Tensor, next_position: int,
                   choices: list[tuple[int, ...]]) -> list[float]:
    """Total log-likelihood of each choice after a prefill (its last logits [V], its cache with the prompt
    in slots [0, cache.length) and the next position). The prompt's cache is left as it was."""
    import torch

    first = torch.log_softmax(logits.float(), -1)
    totals = [float(first[ids[0]]) for ids in choices]
    longer = [n for n, ids in enumerate(choices) if len(ids) > 1]  # one row each in the batched forward
    if not longer:
        return totals
    width = max(len(choices[n]) for n in longer) - 1  # tokens fed: all but each choice's last
    tokens = torch.zeros(len(longer), width, dtype=torch.long)
    positions = torch.full((len(longer), width), -1, dtype=torch.long)  # padding: invisible, and sees nothing
    for row, n in enumerate(longer):
        fed = choices[n][:-1]
        tokens[row, : len(fed)] = torch.tensor(fed)
        positions[row, : len(fed)] = torch.arange(next_position, next_position + len(fed))
    slots = torch.arange(cache.length, cache.length + width, device=model.device)
    with torch.inference_mode():
        out = model.forward(tokens.to(model.device), positions.to(model.device), _expand(cache, len(longer), width),
                            slots, logits_rows=slice(None))
    out = torch.log_softmax(out.float(), -1)  # [rows, width, V]
    for row, n in enumerate(longer):
        follow = torch.tensor(choices[n][1:], device=out.device)
        totals[n] += float(out[row, torch.arange(len(follow), device=out.device), follow].sum())
    return totals


def _expand(cache: KVCache, batch: int, width: int) -> KVCache:
    """A copy of the prompt's cache with `batch` rows and `width` free slots after it."""
    import torch

    length = cache.length

    def rows(t: torch.Tensor) -> torch.Tensor:  # [L, 1, H, capacity, D] -> [L, B, H, length + width, D]
        shape = list(t.shape)
        shape[1], shape[3] = batch, length + width
        out = t.new_empty(shape)
        out[:, :, :, :length] = t[:, :1, :, :length]  # broadcast over the rows: one copy each
        out[:, :, :, length:] = 0
        return out

    positions = cache.positions.new_full((batch, length + width), -1)
    positions[:, :length] = cache.positions[:1, :length]
    context = None if cache.context is None else torch.cat([cache.context[:length],
                                                            cache.context.new_zeros(width)])
    return dataclasses.replace(cache, keys=rows(cache.keys), values=rows(cache.values), positions=positions,
                               length=length, context=context, uploads=None)


def pick(texts: list[str], ids: list[tuple[int, ...]], logliks: list[float], norm: str = "none") -> Scored:
    """The choices with their scores under `norm`, and the best (the first of equals)."""
    scored = [Choice(t, i, ll, ll / NORMS[norm](i, t)) for t, i, ll in zip(texts, ids, logliks)]
    best = max(range(len(scored)), key=lambda n: (scored[n].score, -n))
    return Scored(scored, best)
