"""The query-aware first pass: which reused rows the question reads (ProphetKV, A³).

Reused chunk rows carry keys and values computed without the chunks before them. Recomputing all of
them is full prefill; recomputing the wrong ones buys little. The rows whose staleness reaches the
answer are the rows the question attends to, so a cheap first pass runs only the question's rows
over the reused (re-rotated) cache, as naive reuse would, through every layer, and records per
layer l, query head h and cache row t the causal attention probability a_{l,h,s,t} of question row s:

    read_l(t)  = mean_h sum_s a_{l,h,s,t}                  attention row t receives at layer l
    score(t)   = mean_l read_l(t) / sum_{t' reused} read_l(t')     each layer's share, fused over layers

Normalising per layer keeps layers whose attention sits on the shared head (the sink) from being
drowned out or from dominating. A row's immediate neighbours shape its hidden state most, so the
selection rule also credits each row with NEIGHBOUR_SHARE of the best score within one row of it.
Two priors shape the pick, both tuned on MuSiQue questions 10-21 (5 passages, 10% budget):

    pick(t) = with_neighbours(score)(t) x (inter(t) + 1e-3)^STALENESS_POWER,  each chunk's first SINK_ROWS first

inter(t) is what row t attended to outside its own chunk when the entry was stored (Cache-Craft's
per-token statistic, chunk_cache.craft, computed once per chunk at warm time and stored with the
entry): a row that looked outside its chunk then is one whose K/V the new context changes most,
so the question's attention says which rows matter and inter which of them are stale (CacheBlend's
deviation x attention, without running any chunk row). An entry without it (stored by a mode that
collects no statistics) is ranked by the score alone. Each chunk's first row is the sink its own
rows lean on when it is encoded alone (EPIC); recomputing it in context is cheap and paid first.
First-token KL, mean over questions 10-17 at budget 0.1: score alone 0.082, + first row 0.059, x inter
0.054 (blend at 0.1: 0.124); on 18-21 score alone 0.058, + first row 0.051, both (adopted) 0.056.
Uncached rows before the question (titles, separators) are invisible to the first pass: they are
computed, with the selected rows, in the second pass. The first pass writes only the question's
slots, which the second pass computes again, so it leaves no trace.

Every layer, not the first half (which first-token KL on questions 4-9 had found as good at half the
cost): on MuSiQue dev questions q0-q39 (5 passages, primed entries, 20% budget) teacher-forced agreement
with full prefill's answer rose from 0.936 to 0.947 (0.950 -> 0.960 on q0-q19, 0.922 -> 0.935 on
q20-q39), more than a 30% budget bought (0.939): the deep layers, presumably where the question finds
what its answer copies, pick rows the shallow ones miss. Three-quarters of the layers gave 0.945,
scoring only the deep half 0.948, max over heads 0.947. The first pass costs 9% of the TTFT there
(one CPU thread), twice what half the layers cost.
"""

from __future__ import annotations

import torch

from chunk_cache.decoder import ReuseDecoder

NEIGHBOUR_SHARE = 0.5
SINK_ROWS = 1  # first rows of every reused chunk, recomputed first
STALENESS_POWER = 1.0  # weight of the stored per-token inter-chunk attention (0: ignore it)


def question_attention(model: ReuseDecoder, token_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       cache, reused: torch.Tensor) -> torch.Tensor:
    """Run the question rows (`token_ids`, `positions` [S], cache `slots` [S]) over the cache; returns the
    fused score [cache.length] fp32 of every row (0 outside `reused` [cache.length] bool)."""
    device = model.device
    slots = slots.to(device)
    positions = positions[None].to(device)
    cache.positions[0, slots] = positions[0]
    x = model.embed_tokens(token_ids[None].to(device))
    rope = model.rope(positions)
    masks = model.masks_for(cache, positions, slots)
    key_positions = cache.positions[0, : cache.length]
    hidden = (key_positions < 0)[None, :] | (key_positions[None, :] > positions[0][:, None])  # [S, T]
    on_reused = reused.to(device)
    score = torch.zeros(cache.length, device=device)
    n_layers = model.args.n_layers
    for i in range(n_layers):
        cache.ready(i)
        q, k, v = model.qkv(i, x, rope)
        cache.keys[i, :, :, slots] = k
        cache.values[i, :, :, slots] = v
        read = _read(model, q, cache.keys[i, 0, :, : cache.length], hidden)
        total = read[on_reused].sum()
        if total > 0:
            score += read / total
        if i + 1 < n_layers:  # the last layer's output is never read
            x = model.finish(i, x, q, cache, positions, masks)
    return (score / n_layers).masked_fill(~on_reused, 0.0).cpu()


def with_neighbours(score: torch.Tensor) -> torch.Tensor:
    """score [N] plus NEIGHBOUR_SHARE x the largest score among each row and its two neighbours."""
    nearby = torch.nn.functional.max_pool1d(score[None, None], 3, stride=1, padding=1)[0, 0]
    return score + NEIGHBOUR_SHARE * nearby


def _read(model: ReuseDecoder, q: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """q [1, H, S, D] over keys [H_kv, T, D]: attention each key receives, summed over rows, mean over heads [T]."""
    groups = q.shape[1] // keys.shape[0]
    grouped = q[0].float().reshape(keys.shape[0], groups * q.shape[2], -1)  # [H_kv, G*S, D]: heads share KV heads
    scores = (grouped @ keys.float().transpose(1, 2)) * model.softmax_scale  # [H_kv, G*S, T]
    scores = scores.view(keys.shape[0], groups, q.shape[2], -1).masked_fill(hidden[None, None], float("-inf"))
    return scores.softmax(-1).sum(dim=(0, 1, 2)) / q.shape[1]
