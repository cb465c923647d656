"""The explicit-KV decoder against transformers' own models, and decoding behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from generators.generate import Sampling, decode, pick
from generators.model import load_decoder, rope_frequencies
from generators.weights import model_info
from ragkit.errors import InputError

torch.set_num_threads(1)


@torch.inference_mode()
def prefill_batch(model, prompts: list[list[int]], extra: int):
    """Full prefill of several prompts in one forward (right-padded); returns cache, last logits [B, V]
    and each row's next position [B]."""
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    positions = torch.full((len(prompts), width), -1, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
        positions[row, : len(prompt)] = torch.arange(len(prompt))
    cache = model.new_cache(len(prompts), width + extra)
    slots = torch.arange(width, device=model.device)
    logits = model.forward(tokens.to(model.device), positions.to(model.device), cache, slots,
                           logits_rows=slice(None))
    last = torch.tensor(lengths, device=model.device) - 1
    return cache, logits[torch.arange(len(prompts)), last], torch.tensor(lengths, device=model.device)


def _tiny_hf_model(tmp_path, arch: str, **rope):
    """A randomly initialised small model of `arch`, saved as a local HF folder."""
    import transformers

    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "MistralForCausalLM": transformers.MistralConfig,
                  "Qwen2ForCausalLM": transformers.Qwen2Config}[arch]
    config = config_cls(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=arch == "LlamaForCausalLM", **rope)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random biases, so Qwen2's q/k/v bias path is exercised
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    folder = tmp_path / arch
    model.save_pretrained(folder)
    return model, folder


def _full_logits(model, ids):
    cache = model.new_cache(1, ids.shape[1])
    positions = torch.arange(ids.shape[1])
    return model.forward(ids, positions[None], cache, positions, logits_rows=slice(None))[0]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_tiny_models_match_transformers(tmp_path, arch):
    hf, folder = _tiny_hf_model(tmp_path, arch)
    ours = load_decoder(model_info(folder))
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits[0]
    assert (expected - _full_logits(ours, ids)).abs().max() < 1e-4


@pytest.mark.slow
def test_smollm2_full_prefill_and_split_prefill_match_transformers():
    from transformers import AutoModelForCausalLM

    from generators.weights import resolve_model_dir

    folder = resolve_model_dir("smollm2")
    ours = load_decoder(model_info(folder))
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 96), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids).logits[0]
    assert (expected - _full_logits(ours, ids)).abs().max() < 1e-3
    # the masked path: a cached first part, then the rest attending to it with the exact mask
    cache = ours.new_cache(1, 96)
    positions = torch.arange(96)
    ours.forward(ids[:, :50], positions[None, :50], cache, positions[:50])
    rest = ours.forward(ids[:, 50:], positions[None, 50:], cache, positions[50:], logits_rows=slice(None))[0]
    assert (expected[50:] - rest).abs().max() < 1e-3


def test_greedy_decode_matches_transformers_generate(tmp_path):
    hf, folder = _tiny_hf_model(tmp_path, "LlamaForCausalLM")
    ours = load_decoder(model_info(folder))
    prompt = [5, 17, 42, 99, 3, 250]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                               pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    cache, logits, next_pos = prefill_batch(ours, [prompt], extra=12)
    streamed = []
    out = decode(ours, cache, logits, next_pos, 12, on_token=lambda row, tok: streamed.append(tok))[0]
    assert out == expected
    assert streamed == expected


def test_stop_tokens_and_token_budget(tmp_path):
    _, folder = _tiny_hf_model(tmp_path, "LlamaForCausalLM")
    ours = load_decoder(model_info(folder))
    prompt = [5, 17, 42, 99]
    cache, logits, next_pos = prefill_batch(ours, [prompt], extra=10)
    free = decode(ours, cache, logits, next_pos, 10)[0]
    assert len(free) == 10
    cache, logits, next_pos = prefill_batch(ours, [prompt], extra=10)
    stopped = decode(ours, cache, logits, next_pos, 10, stop_ids=frozenset({free[3]}))[0]
    assert stopped == free[: free.index(free[3])]


def test_batched_prompts_decode_like_single_ones(tmp_path):
    _, folder = _tiny_hf_model(tmp_path, "Qwen2ForCausalLM")
    ours = load_decoder(model_info(folder))
    prompts = [[5, 17, 42, 99, 3, 250, 7], [8, 9], [100, 101, 102, 103]]
    singles = []
    for prompt in prompts:
        cache, logits, next_pos = prefill_batch(ours, [prompt], extra=6)
        singles.append(decode(ours, cache, logits, next_pos, 6)[0])
    cache, logits, next_pos = prefill_batch(ours, prompts, extra=6)
    assert decode(ours, cache, logits, next_pos, 6) == singles


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    draws = {int(pick(logits, Sampling(1.0, 1.0), torch.Generator().manual_seed(s))) for s in range(40)}
    assert draws >= {1, 2}
    same = [int(pick(logits, Sampling(1.0, 1.0), torch.Generator().manual_seed(7))) for _ in range(3)]
    assert len(set(same)) == 1
    tight = {int(pick(logits, Sampling(1.0, 0.3), torch.Generator().manual_seed(s))) for s in range(40)}
    assert tight == {1}
    assert int(pick(logits, Sampling(0.0), None)) == 1


def test_unsupported_architecture_is_refused(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(InputError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_decoder(model_info(folder))


@pytest.mark.parametrize("rope_type", ["dynamic"])  # longrope: generators.families, tests/test_families.py
def test_length_dependent_rope_is_refused(rope_type):
    config = {"rope_parameters": {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}}
    with pytest.raises(InputError, match="changes frequencies with sequence length"):
        rope_frequencies(config, 64)


def test_linear_and_llama3_rope_match_transformers(tmp_path):
    for rope in ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
                 {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64}}):
        hf, folder = _tiny_hf_model(tmp_path, "LlamaForCausalLM", **rope)
        ours = load_decoder(model_info(folder))
        ids = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = hf(ids).logits[0]
        assert (expected - _full_logits(ours, ids)).abs().max() < 1e-4
