"""The same checks on every device this machine has: CPU always, CUDA when present.

CI has no GPU, so there these run on CPU only, bf16 included; on a GPU machine the CUDA twin of
each runs too (device tier, pinned host memory, SDPA kernels, bf16 by default). A small random
Llama with a word-level tokenizer built here stands in for the generator, so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from chunk_cache.store import CacheKey, ChunkKV, KVStore
from generators.model import load_decoder
from generators.weights import model_info
from ragkit.cli import app
from ragkit.config import CacheConfig, GeneratorConfig
from ragkit.types import Chunk, token_hash
from tests.test_pipeline import DOCS, make_beir, make_config
from tests.test_reuse import _logits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PASSAGES = [text for _, _, text in DOCS]
QUESTION = "Which supplements reduce the risk of fractures in older adults?"


def _words() -> list[str]:
    text = " ".join([*PASSAGES, QUESTION, GeneratorConfig().system_prompt, "Documents: Question: Title: Answer:",
                     *(title for _, title, _ in DOCS)])
    return sorted(set(re.findall(r"\w+|[^\w\s]", text)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random 4-layer Llama (GQA, 6 query heads over 2 KV heads, as SmolLM2's 9 over 3) and its tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("devices") / "model"
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(_words())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                         eos_token="</s>").save_pretrained(folder)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=96, intermediate_size=192,
                                      num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                                      max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _rag(model_dir: Path, device: str, dtype: str):
    from generators.rag import RagGenerator

    generator = {**dataclasses.asdict(GeneratorConfig()), "model": str(model_dir), "device": device,
                 "dtype": dtype, "max_new_tokens": 6}
    cache = {**dataclasses.asdict(CacheConfig()), "dir": ""}
    return RagGenerator(generator, cache)


def _chunks(rag) -> list[Chunk]:
    chunks = []
    for i, text in enumerate(PASSAGES[:4]):
        ids = rag.prompt.chunk_ids(text)
        chunks.append(Chunk(id=f"d{i}#0", doc_id=f"d{i}", text=text, token_ids=ids, span=(0, len(text)),
                            content_hash=token_hash(ids)))
    return chunks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_matches_transformers(model_dir, device, dtype):
    """fp32: within 1e-3 of transformers on the same device. bf16: no further from transformers' fp32
    logits than transformers' own bf16 model is (plus a small allowance for a different summation order)."""
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(2, 40, (1, 96), generator=torch.Generator().manual_seed(3)).to(device)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    ours = load_decoder(model_info(model_dir), device, dtype)
    cache = ours.new_cache(1, ids.shape[1])
    positions = torch.arange(ids.shape[1], device=device)
    with torch.inference_mode():
        reference = hf(ids).logits[0].float()
        logits = ours.forward(ids, positions[None], cache, positions, logits_rows=slice(None))[0].float()
        assert logits.device.type == device and cache.keys.dtype == dtype
        if dtype == torch.float32:
            assert (logits - reference).abs().max() < 1e-3
        else:
            hf_low = hf.to(dtype)(ids).logits[0].float()
            assert (logits - reference).abs().max() <= 2 * (hf_low - reference).abs().max() + 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_reuse_modes_in_fp32_keep_their_exactness(model_dir, device):
    """The CPU test's equalities, on this device: prefix is exact, blend at ratio 1.0 is full prefill,
    blend with nothing recomputed is naive; every mode answers."""
    rag = _rag(model_dir, device, "float32")
    chunks = _chunks(rag)
    rag.warm(chunks, progress=False)
    full, _ = _logits(rag, QUESTION, chunks, "full")
    assert full.device.type == device
    prefix, stats = _logits(rag, QUESTION, chunks, "prefix")
    assert (full - prefix).abs().max() < 1e-3 and stats["cache_hits"] == 1
    blend, stats = _logits(rag, QUESTION, chunks, "blend", ratio=1.0)
    assert (full - blend).abs().max() < 1e-3
    assert stats["recomputed_tokens"] == sum(len(c.token_ids) for c in chunks[1:])
    naive, _ = _logits(rag, QUESTION, chunks, "naive")
    blend0, _ = _logits(rag, QUESTION, chunks, "blend", ratio=0.0, full_layers=0)
    assert (naive - blend0).abs().max() < 1e-4 and (naive - full).abs().max() > 1e-3
    for mode in ("full", "prefix", "naive", "ape", "blend", "craft"):
        answer = rag.answer(QUESTION, chunks, mode=mode)
        assert answer.mode == mode and len(answer.tokens) <= 6 and answer.ttft_s > 0


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_default_answers_like_fp32_within_bf16_error(model_dir, device):
    """`dtype = "auto"` is bf16 on CUDA (asked for explicitly on CPU here): the cache holds bf16 KV, and
    blend at ratio 1.0 stays as close to full prefill as bf16 rounding allows."""
    from generators.rag import pick_device

    assert pick_device(device, "auto")[1] == (torch.bfloat16 if device == "cuda" else torch.float32)
    rag = _rag(model_dir, device, "auto" if device == "cuda" else "bfloat16")
    chunks = _chunks(rag)
    rag.warm(chunks, progress=False)
    kv = rag.store.get(rag.keys.shared(chunks[2].token_ids))
    assert kv.keys.dtype == torch.bfloat16 and kv.keys.device.type == device
    full, cache, _, _ = rag.prefill(QUESTION, chunks, mode="full")
    blend, _ = _logits(rag, QUESTION, chunks, "blend", ratio=1.0)
    naive, _ = _logits(rag, QUESTION, chunks, "naive")
    assert cache.keys.dtype == torch.bfloat16
    scale = full.float().abs().max()
    assert (full.float() - blend.float()).abs().max() < 0.05 * scale
    assert (full.float() - blend.float()).abs().max() < (full.float() - naive.float()).abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_store_moves_entries_down_the_tiers_and_back_unchanged(tmp_path, device):
    """A device tier (CUDA only) spills to pinned host memory, host to disk; a get returns the same bf16
    bytes on the device, whichever tier held them."""
    shape = (2, 2, 16, 8)  # [layers, kv_heads, tokens, head_dim]
    entry_bytes = 2 * 2 * np.prod(shape)  # keys and values, bf16
    store = KVStore(tmp_path / "kv", "model-x", device=device, device_bytes=int(entry_bytes),
                    host_bytes=int(entry_bytes), disk_bytes=1 << 20)
    originals = {}
    for i in range(3):
        key = CacheKey("model-x", "bfloat16", "prefix", f"chunk{i}")
        kv = ChunkKV(torch.randn(shape).to(torch.bfloat16), torch.randn(shape).to(torch.bfloat16), start=5)
        originals[key] = kv
        store.put(key, kv)
    tiers = store.stats()["tiers"]
    assert list(tiers) == (["device", "host", "disk"] if device == "cuda" else ["host", "disk"])
    assert tiers["disk"]["entries"] >= 1  # the oldest left memory for disk
    for key, kv in originals.items():
        got = store.get(key)
        assert got.keys.device.type == device and got.start == 5
        assert torch.equal(got.keys.cpu(), kv.keys) and torch.equal(got.values.cpu(), kv.values)
    reopened = KVStore(tmp_path / "kv", "model-x", device=device, host_bytes=0)
    first = next(iter(originals))
    assert torch.equal(reopened.get(first).values.cpu(), originals[first].values)


@pytest.mark.parametrize("device", DEVICES)
def test_entries_in_host_memory_go_up_layer_by_layer_and_then_stay_on_the_device(model_dir, tmp_path, device):
    """Entries another process warmed come from disk into (page-locked, on CUDA) host memory; a prefill
    reusing them copies them up layer by layer (on a side stream on CUDA) and computes what it computes
    from entries already on the device; once committed, the device tier holds them (CUDA only)."""
    rag = _rag(model_dir, device, "auto" if device == "cuda" else "float32")
    chunks = _chunks(rag)
    rag.store = KVStore(tmp_path / "kv", rag.fingerprint, device=device, device_bytes=1 << 30)
    rag.warm(chunks, progress=False)
    resident, *_ = rag.prefill(QUESTION, chunks, mode="naive")
    rag.store = KVStore(tmp_path / "kv", rag.fingerprint, device=device, device_bytes=1 << 30)  # disk only
    held = rag.store.get(rag.keys.shared(chunks[0].token_ids), upload=False)
    assert held.keys.device.type == "cpu" and held.keys.is_pinned() == (device == "cuda")
    uploaded, cache, _, stats = rag.prefill(QUESTION, chunks, mode="naive")
    assert stats["cache_hits"] == len(chunks) and cache.uploads is None
    assert torch.equal(uploaded, resident)
    stats["commit"](0.0)
    tiers = rag.store.stats()["tiers"]
    first = "device" if device == "cuda" else "host"
    assert tiers[first]["entries"] == len(chunks) + 1 and sum(t["entries"] for t in tiers.values()) \
        == tiers[first]["entries"] + tiers["disk"]["entries"]  # the head and every chunk, held once in memory
    assert rag.store.get(rag.keys.shared(chunks[0].token_ids), upload=False).keys.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_query_answers_on_the_default_device_with_no_device_setting(model_dir, tmp_path, device, monkeypatch):
    """`ragkit query --answer` with `device` left at auto: CUDA when present, else CPU; same output shape."""
    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_beir(tmp_path / "data")
    cfg = make_config(tmp_path, extra=f'[generator]\nmodel = "{model_dir}"\nmax_new_tokens = 4\nchunks = 2\n'
                                      f'[cache]\ndir = "{tmp_path / "kv"}"\n')
    runner = CliRunner()
    assert runner.invoke(app, ["index", str(cfg), "-q"]).exit_code == 0
    result = runner.invoke(app, ["query", str(cfg), "risk of fractures in older adults", "--answer"])
    assert result.exit_code == 0, result.output
    cited = re.search(r"^cited: (.+)$", result.stdout, re.M).group(1).split(", ")
    assert len(cited) == 2 and cited[0].startswith("d1")
    assert re.search(r"^ttft: [0-9.]+s  cache hits: 0/2 ", result.stdout, re.M)
    assert list((tmp_path / "kv").rglob("*.safetensors"))  # what the request computed is kept for the next one
