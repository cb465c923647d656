"""KV reuse: RoPE re-rotation, exact masks, and each mode against full prefill on SmolLM2."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import torch

from chunk_cache.keys import APPROX
from chunk_cache.reuse import ChunkReuse
from chunk_cache.rope import rerotate
from chunk_cache.store import CacheKey, ChunkKV, KVStore
from generators import model as model_module
from generators.model import ape_attention, attention_masks, masked_attention, rope_frequencies
from ragkit.config import CacheConfig, GeneratorConfig
from ragkit.errors import ConfigError
from ragkit.types import Chunk, token_hash

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[1] / "data" / "musique" / "musique_s.json.gz"


def _rotate(x, positions, inv_freq, scaling):
    """Reference RoPE: x [T, D] at positions [T], rotate-half layout."""
    angles = positions[:, None].double() * inv_freq.double()
    angles = torch.cat([angles, angles], -1)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return (x.double() * angles.cos() + rot.double() * angles.sin()) * scaling


@pytest.mark.parametrize("params", [
    {"rope_type": "default", "rope_theta": 100000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
])
def test_rerotation_equals_encoding_at_the_new_position(params):
    config = {"rope_parameters": params, "max_position_embeddings": 4096, "hidden_size": 64,
              "num_attention_heads": 1, "head_dim": 64}
    inv_freq, scaling = rope_frequencies(config, 64)
    keys = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    old = torch.arange(30, 37)
    for delta in (777, -25, 3000):
        stored = _rotate(keys, old, inv_freq, scaling).float()
        moved = rerotate(stored, delta, inv_freq)
        expected = _rotate(keys, old + delta, inv_freq, scaling).float()
        assert (moved - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert scaling != 1.0 or params["rope_type"] != "yarn"  # yarn's mscale is applied once, not twice


def _reference_attention(q, k, v, key_pos, query_pos, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.zeros_like(q)
    for s in range(q.shape[2]):
        allowed = (key_pos[0] >= 0) & (key_pos[0] <= query_pos[0, s])
        scores = (q[0, :, s, None] @ k[0, :, allowed].transpose(-1, -2)) * scale  # [H, 1, n]
        out[0, :, s] = (scores.softmax(-1) @ v[0, :, allowed])[:, 0]
    return out


def test_masked_attention_is_exactly_causal_for_scattered_rows(monkeypatch):
    monkeypatch.setattr(model_module, "QUERY_BLOCK", {"cpu": 8, "other": 8})  # several blocks, different key reach
    g = torch.Generator().manual_seed(0)
    T = 60
    k, v = torch.randn(1, 2, T, 16, generator=g), torch.randn(1, 2, T, 16, generator=g)
    key_pos = torch.arange(T)[None].clone()
    key_pos[0, 40:45] = -1  # empty slots
    rows = torch.tensor([3, 4, 17, 18, 19, 33, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59])
    q = torch.randn(1, 6, len(rows), 16, generator=g)
    got = masked_attention(q, k, v, attention_masks(key_pos, rows[None]), 0.25)
    assert torch.allclose(got, _reference_attention(q, k, v, key_pos, rows[None], 0.25), atol=1e-5)


def test_attention_received_sums_exact_causal_weights_over_heads_and_queries():
    """Blend's selection weight: per slot, the attention it receives, against a per-query reference."""
    from types import SimpleNamespace

    from chunk_cache.reuse import _attention_received

    g = torch.Generator().manual_seed(2)
    n_layers, kv_heads, heads, T, D = 2, 2, 6, 40, 16
    key_pos = torch.arange(T)[None].clone()
    key_pos[0, 30:33] = -1  # empty slots receive nothing
    cache = SimpleNamespace(keys=torch.randn(n_layers, 1, kv_heads, T, D, generator=g), positions=key_pos, length=T)
    rows = torch.tensor([[20, 35, 39]])
    q = torch.randn(1, heads, 3, D, generator=g)
    got = _attention_received(SimpleNamespace(softmax_scale=0.25), 1, q, rows, cache)
    expected = torch.zeros(T)
    for h in range(heads):
        for s, position in enumerate(rows[0].tolist()):
            visible = (key_pos[0] >= 0) & (key_pos[0] <= position)
            scores = cache.keys[1, 0, h // (heads // kv_heads)][visible] @ q[0, h, s] * 0.25
            expected[visible] += scores.softmax(-1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert got[30:33].abs().max() == 0 and abs(float(got.sum()) - heads * 3) < 1e-4


def test_ape_attention_at_t_s_one_is_ordinary_attention_and_reweights_otherwise():
    g = torch.Generator().manual_seed(1)
    T = 30
    k, v = torch.randn(1, 1, T, 8, generator=g), torch.randn(1, 1, T, 8, generator=g)
    key_pos = torch.arange(T)[None]
    context = torch.zeros(T, dtype=torch.bool)
    context[5:20] = True
    q = torch.randn(1, 2, 4, 8, generator=g)
    query_pos = torch.tensor([[26, 27, 28, 29]])
    plain = masked_attention(q, k, v, attention_masks(key_pos, query_pos), 0.3)
    assert torch.allclose(ape_attention(q, k, v, key_pos, query_pos, context, (1.0, 1.0), 0.3), plain, atol=1e-5)
    assert not torch.allclose(ape_attention(q, k, v, key_pos, query_pos, context, (0.9, 0.9), 0.3), plain, atol=1e-3)


# --- modes on the real model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def rag():
    from generators.rag import RagGenerator

    cache = dataclasses.asdict(CacheConfig())
    cache["dir"] = ""
    generator = dataclasses.asdict(GeneratorConfig())
    generator["max_new_tokens"] = 8
    return RagGenerator(generator, cache)


@pytest.fixture(scope="module")
def sample(rag):
    example = json.loads(gzip.open(DATA).read())[0]
    chunks = []
    for i, ctx in enumerate(example["ctxs"][:3]):
        ids = rag.prompt.chunk_ids(ctx["text"])[:48]
        chunks.append(Chunk(id=f"m0#{i}", doc_id="m0", text="", token_ids=ids, span=(0, 0),
                            content_hash=token_hash(ids)))
    rag.warm(chunks, progress=False)
    return example["question"], chunks


def _logits(rag, question, chunks, mode, **settings):
    saved = rag.settings
    rag.settings = dataclasses.replace(saved, **settings)
    try:
        logits, _cache, _pos, stats = rag.prefill(question, chunks, mode=mode)
    finally:
        rag.settings = saved
    return logits, stats


@pytest.mark.slow
def test_prefix_reuse_is_exact_and_reuses_only_the_leading_chunk(rag, sample):
    full, _ = _logits(rag, *sample, "full")
    prefix, stats = _logits(rag, *sample, "prefix")
    assert (full - prefix).abs().max() < 1e-3
    assert stats["cache_hits"] == 1
    assert stats["recomputed_tokens"] == 2 * 48


@pytest.mark.slow
def test_blend_at_ratio_one_reproduces_full_prefill(rag, sample):
    full, _ = _logits(rag, *sample, "full")
    blend, stats = _logits(rag, *sample, "blend", ratio=1.0)
    assert (full - blend).abs().max() < 1e-3
    assert stats["recomputed_tokens"] == 2 * 48  # every non-exact chunk row; the leading chunk is exact
    rag.settings = dataclasses.replace(rag.settings, ratio=1.0)
    try:
        assert rag.answer(*sample, mode="blend").tokens == rag.answer(*sample, mode="full").tokens
    finally:
        rag.settings = dataclasses.replace(rag.settings, ratio=CacheConfig().ratio)


@pytest.mark.slow
def test_blend_without_full_layers_or_picks_is_naive_and_partial_blend_moves_toward_full(rag, sample):
    full, _ = _logits(rag, *sample, "full")
    naive, naive_stats = _logits(rag, *sample, "naive")
    blend0, _ = _logits(rag, *sample, "blend", ratio=0.0, full_layers=0)
    assert (naive - blend0).abs().max() < 1e-4
    assert naive_stats["recomputed_tokens"] == 0 and naive_stats["cache_hits"] == 3
    assert (naive - full).abs().max() > 1e-2  # reuse without recompute is not exact
    blend, stats = _logits(rag, *sample, "blend", ratio=0.5)
    assert stats["recomputed_tokens"] == 48  # half of the two non-leading chunks
    kl = lambda p, q: float((p.log_softmax(-1).exp() * (p.log_softmax(-1) - q.log_softmax(-1))).sum())  # noqa: E731
    assert kl(full, blend) < kl(full, naive)


@pytest.mark.slow
def test_craft_and_ape_run_and_report_their_recompute(rag, sample):
    craft, stats = _logits(rag, *sample, "craft")
    assert 0 < stats["recomputed_tokens"] < 2 * 48  # the leading chunk (exact) never; the others partly
    ape, ape_stats = _logits(rag, *sample, "ape")
    assert ape_stats["recomputed_tokens"] == 0 and torch.isfinite(ape).all()
    answer = rag.answer(*sample, mode="ape")
    assert answer.mode == "ape" and len(answer.tokens) <= 8


@pytest.mark.slow
def test_prefix_mode_stores_what_it_computed_like_a_prefix_cache(rag, sample):
    question, chunks = sample
    reordered = [chunks[2], chunks[0], chunks[1]]
    first = rag.answer(question, reordered, mode="prefix")
    assert first.cache_hits == 1 and first.recomputed_tokens == 2 * 48  # only the leading chunk sits behind the
    # prefix it was encoded behind; the others are computed, then stored under their exact prefix
    again = rag.answer(question, reordered, mode="prefix")
    assert again.cache_hits == 3 and again.recomputed_tokens == 0
    full, _ = _logits(rag, question, reordered, "full")
    cached, _ = _logits(rag, question, reordered, "prefix")
    assert (full - cached).abs().max() < 1e-3


@pytest.mark.slow
def test_ape_ignores_entries_stored_behind_earlier_chunks(rag, sample):
    """APE lays chunks side by side, so a chunk encoded behind another is no exact prefix for it."""
    question, chunks = sample
    saved, rag.store = rag.store, KVStore(None, rag.fingerprint)
    try:
        rag.warm(chunks, progress=False)
        before, _ = _logits(rag, question, chunks, "ape")
        rag.answer(question, chunks, mode="prefix")  # stores chunks 2 and 3 behind the chunks before them
        after, _ = _logits(rag, question, chunks, "ape")
    finally:
        rag.store = saved
    assert torch.equal(before, after)


def _uncached(rag, monkeypatch, text: str) -> Chunk:
    """A chunk not in the cache; encoding any chunk behind the prefix fails the test (a miss is computed once)."""
    ids = rag.prompt.chunk_ids(text)
    monkeypatch.setattr(rag.reuse, "encode", lambda _ids: pytest.fail("a miss must not be encoded a second time"))
    return Chunk(id=f"new#{token_hash(ids)[:8]}", doc_id="new", text="", token_ids=ids, span=(0, 0),
                 content_hash=token_hash(ids))


@pytest.mark.slow
def test_uncached_chunk_is_computed_once_and_its_rows_stored(rag, sample, monkeypatch):
    question, chunks = sample
    fresh = _uncached(rag, monkeypatch, "An uncached passage about the river Exe and Exeter College, Oxford.")
    ids = fresh.token_ids
    first = rag.answer(question, chunks + [fresh], mode="naive")
    assert first.cache_hits == 3 and first.recomputed_tokens == len(ids)
    [key] = rag.store.variants(rag.keys.dtype, token_hash(ids))  # computed behind inexact rows: exact nowhere
    assert key.context_hash.startswith(APPROX) and rag.store.get(rag.keys.shared(ids)) is None
    stored = rag.store.get(key)
    # The entry holds the rows as computed in that request, at the position they sat at.
    _logits_, cache, _pos, _stats = rag.prefill(question, chunks + [fresh], mode="naive")
    segments = rag.prompt.segments(question, chunks + [fresh])
    at = [seg.token_ids for seg in segments].index(tuple(ids))
    n = sum(len(seg.token_ids) for seg in segments[:at])
    assert stored.start == n
    assert torch.allclose(stored.values, cache.values[:, 0, :, n: n + len(ids)])
    again = rag.answer(question, chunks + [fresh], mode="naive")
    assert again.cache_hits == 4 and again.recomputed_tokens == 0
    # Moved to the front, the rows are still not what a prompt with nothing before them computes: blend
    # must treat them as reused (recompute candidates), never as an exact prefix.
    _l, _c, _p, moved = rag.prefill(question, [fresh] + chunks, mode="blend", ratio=1.0)
    assert moved["recomputed_tokens"] == len(ids) + 3 * 48


@pytest.mark.slow
def test_uncached_leading_chunk_is_stored_as_its_shared_prefix_encoding(rag, sample, monkeypatch):
    question, chunks = sample
    fresh = _uncached(rag, monkeypatch, "A second uncached passage, on the Thames barrier.")
    ids = fresh.token_ids
    rag.answer(question, [fresh] + chunks, mode="naive")
    stored = rag.store.get(rag.keys.shared(ids))
    encoded = ChunkReuse(rag.model, KVStore(None, rag.fingerprint), rag.keys).encode(ids)
    assert stored is not None and (stored.values - encoded.values).abs().max() < 1e-4


@pytest.mark.slow
def test_misses_behind_an_exact_prefix_make_a_repeat_exact_and_stay_reusable_elsewhere(rag, sample, monkeypatch):
    question, chunks = sample
    first = _uncached(rag, monkeypatch, "A third uncached passage, on the Severn bore and its tides.")
    second = _uncached(rag, monkeypatch, "A fourth uncached passage, on the lighthouses of the Orkney islands.")
    entries = len(rag.store.stats()["entries"])
    rag.answer(question, [first, second], mode="blend")
    assert len(rag.store.stats()["entries"]) == entries + 2  # one entry per miss, whatever keys find it
    # Asked again, both chunks are exact prefixes (as in a prefix cache): nothing is recomputed.
    again = rag.answer(question, [first, second], mode="blend")
    assert again.cache_hits == 2 and again.recomputed_tokens == 0
    full, _ = _logits(rag, question, [first, second], "full")
    blend, _ = _logits(rag, question, [first, second], "blend")
    assert (full - blend).abs().max() < 1e-3
    # Behind another chunk the second's rows are reused, inexactly: a recompute candidate, not a miss.
    _l, _c, _p, moved = rag.prefill(question, [chunks[0], second], mode="blend", ratio=1.0)
    assert moved["cache_hits"] == 2
    assert moved["recomputed_tokens"] == len(second.token_ids)


def test_a_chunks_variants_are_found_by_other_processes_through_the_folder(tmp_path):
    """No per-process alias: a store opened later on the same folder lists every variant of a chunk."""
    writer = KVStore(tmp_path / "kv", "m")
    kv = ChunkKV(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), start=9, context=("c1", "c0"))
    keys = [CacheKey("m", "float32", context, "chunk") for context in ("exact-a", APPROX + "b")]
    for key in keys:
        writer.put(key, kv)
    writer.put(CacheKey("m", "float32", "exact-a", "other-chunk"), kv)
    reader = KVStore(tmp_path / "kv", "m", host_bytes=0)
    assert reader.variants("float32", "chunk") == sorted(keys, key=lambda k: k.context_hash)
    assert reader.variants("bfloat16", "chunk") == [] and reader.get(keys[1]).context == ("c1", "c0")
    writer.put(CacheKey("m", "float32", "exact-c", "chunk"), kv)  # written after the reader opened the folder
    reader.flush()
    assert len(reader.variants("float32", "chunk")) == 3


@pytest.mark.slow
def test_sampled_answers_follow_the_run_seed(rag, sample, tmp_path):
    from generators.generate import Sampling
    from ragkit.pipeline import Pipeline

    saved = rag.sampling
    try:
        answers = {}
        for seed in (0, 1, 2, 3, 0):
            rag.sampling = Sampling(1.5, 1.0, seed)
            answers.setdefault(seed, []).append(rag.answer(*sample, mode="naive").tokens)
    finally:
        rag.sampling = saved
    assert answers[0][0] == answers[0][1]  # the same seed samples the same answer
    assert len({tuple(a[0]) for a in answers.values()}) > 1
    config = tmp_path / "c.toml"
    config.write_text('seed = 11\n[dataset]\nformat = "jsonl"\npath = "x.jsonl"\n'
                      '[generator]\ntemperature = 0.7\n[cache]\ndir = ""\n')
    assert Pipeline.from_config(config).generator.sampling == Sampling(0.7, 1.0, 11)


@pytest.mark.slow
def test_bench_holds_a_questions_chunks_that_an_earlier_question_cached(rag, sample):
    from ragkit.bench.cache import hold

    _question, (c0, c1, c2) = sample
    saved = rag.store
    entry = saved.get(rag.keys.shared(c0.token_ids))
    try:  # room for two chunks; c0 was cached first, so it is the one LRU would drop next
        rag.store = KVStore(None, rag.fingerprint, host_bytes=2 * entry.nbytes() + 1024)
        rag.warm([c0], progress=False)
        rag.warm([c1], progress=False)
        hold(rag, [c0, c2])
        assert [rag.keys.shared(c.token_ids) in rag.store for c in (c0, c1, c2)] == [True, False, True]
    finally:
        rag.store = saved


def test_unknown_mode_is_a_config_error():
    from generators.rag import RagGenerator

    cache = dataclasses.asdict(CacheConfig())
    cache["mode"] = "magic"
    with pytest.raises(ConfigError, match="cache.mode"):
        RagGenerator(dataclasses.asdict(GeneratorConfig()), cache)


@pytest.mark.slow
def test_cache_folder_holding_another_models_entries_is_shared_not_refused(tmp_path):
    from generators.rag import RagGenerator

    KVStore(tmp_path / "kv", "some-other-model").put(CacheKey("some-other-model", "float32", "p", "c"),
                                                     ChunkKV(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), 0))
    cache = dataclasses.asdict(CacheConfig())
    cache["dir"] = str(tmp_path / "kv")
    rag = RagGenerator(dataclasses.asdict(GeneratorConfig()), cache)
    assert rag.store.variants("float32", "c") == []  # the other model's entry is never ours


@pytest.mark.slow
def test_bench_pieces_report_consistent_figures(rag, sample):
    from ragkit.bench import cache as bench

    question, chunks = sample
    items = [(question, chunks[:2], ["Exeter College"]), ("Who wrote it?", chunks[1:], ["Thomas Nabbes"])]
    modes = bench.compare_modes(rag, items, ["naive", "blend@1.0"], lambda p, g: (0.0, 0.5))
    assert list(modes) == ["full", "naive", "blend@1.0"]
    assert modes["full"]["token_agreement"] == 1.0 and modes["full"]["speedup_vs_full"] == 1.0
    assert modes["blend@1.0"]["token_agreement"] == 1.0 and modes["blend@1.0"]["first_token_kl"] < 1e-6
    assert modes["full"]["decisive_agreement"] == modes["blend@1.0"]["decisive_agreement"] == 1.0
    assert 0 < modes["full"]["decisive_share"] <= 1  # some reference tokens are chosen by a clear margin
    # a flip is counted among decisive tokens only where full's margin was wide
    assert modes["naive"]["decisive_agreement"] >= 0 and modes["naive"]["decisive_share"] == modes["full"]["decisive_share"]
    assert modes["naive"]["recompute_share"] == 0.0 and modes["full"]["recompute_share"] == 1.0
    per_question = modes["naive"]["per_question"]  # enough to pool agreement over any subset of questions
    pooled = sum(q["agreement"] * q["reference_tokens"] for q in per_question)
    assert pooled / sum(q["reference_tokens"] for q in per_question) == pytest.approx(modes["naive"]["token_agreement"])
    assert all(r["f1"] == 0.5 and r["questions"] == 2 for r in modes.values())
    assert list(bench.compare_modes(rag, items[:1], ["full"], None)) == ["full"]  # the reference alone
    disk = bench.disk_load_speedup(rag, chunks[:1], repeats=1)
    assert disk["load_s_median"] > 0 and disk["chunk_bytes_mean"] > 0

    def make_rag(mode, eviction, cap):
        rag.settings = dataclasses.replace(rag.settings, mode=mode)
        rag.store = KVStore(None, rag.fingerprint, host_bytes=cap, eviction=eviction)
        return rag

    saved = rag.settings, rag.store
    try:
        stream = [items[i][:2] for i in [0, 1, 0]]
        served = bench.retrieval_workload(make_rag, stream, 1 << 30, lambda _m: None)
    finally:
        rag.settings, rag.store = saved
    assert served["full"]["chunk_hit_rate"] == 0.0 and served["full"]["throughput_vs_full"] == 1.0
    assert served["blend+lru"]["chunk_hit_rate"] > 0  # chunks recur across the stream
