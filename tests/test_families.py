"""Every family against transformers, and exact under KV reuse.

Each case is a tiny random model built by transformers from the family's own config class (written as
published: some in the 4.x RoPE spelling), with SmolLM2's tokenizer. Windows are 16 tokens and prompts
are longer, so every sliding-window path (exact masks, the causal kernel, decoding, APE) cuts keys off.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from chunk_cache.assembly import CHUNK, HEAD, Segment, assemble
from chunk_cache.modes import MODES
from chunk_cache.rope import rerotate
from chunk_cache.store import ChunkKV
from generators.generate import decode
from generators.model import load_decoder
from generators.weights import model_info
from ragkit.config import CacheConfig, GeneratorConfig
from ragkit.errors import ConfigError, InputError
from ragkit.types import Chunk
from tests.conftest import text_chunks

torch.set_num_threads(1)
WINDOW = 16
COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=None, bos_token_id=None,
              eos_token_id=None, tie_word_embeddings=False, initializer_range=0.1)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 64}


def _longrope(partial: float = 1.0, switch: int = 4096) -> dict:
    half = int(16 * partial) // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
            "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [2.0 + 0.5 * i for i in range(half)],
            "original_max_position_embeddings": switch}


# name -> (config class, its arguments, the config.json spelling: None as saved, "4.x" or "4.x-type")
CASES = {
    "llama3.1": ("LlamaConfig", dict(rope_parameters=LLAMA3), None),
    "llama3.1-4.x": ("LlamaConfig", dict(rope_parameters=LLAMA3), "4.x"),
    "llama3.1-4.x-type": ("LlamaConfig", dict(rope_parameters=LLAMA3), "4.x-type"),
    "llama3.2-tied": ("LlamaConfig", dict(rope_parameters=LLAMA3, tie_word_embeddings=True), "4.x"),
    "mistral-v0.1-window": ("MistralConfig", dict(sliding_window=WINDOW), None),
    "qwen2.5-yarn": ("Qwen2Config", dict(rope_parameters=YARN), None),
    "qwen2.5-yarn-4.x": ("Qwen2Config", dict(rope_parameters=YARN), "4.x-type"),
    "qwen2-swa": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), None),
    "qwen3": ("Qwen3Config", dict(head_dim=16, attention_bias=True), None),  # o_proj has a bias too
    "qwen3-moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=True, mlp_only_layers=[2]), None),
    "mixtral-window": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
                       None),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                    tie_word_embeddings=True), None),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                        sliding_window_pattern=2, tie_word_embeddings=True,
                                        rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": 10000.0},
                                                         "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                            "rope_theta": 1000000.0}}), "4.x"),
    "phi3-longrope": ("Phi3Config", dict(rope_parameters=_longrope(), original_max_position_embeddings=4096,
                                         max_position_embeddings=131072), "4.x-type"),
    "phi4-mini-partial": ("Phi3Config", dict(rope_parameters=_longrope(0.75), partial_rotary_factor=0.75,
                                             original_max_position_embeddings=4096, max_position_embeddings=131072,
                                             tie_word_embeddings=True), None),
    "olmo2": ("Olmo2Config", {}, None),
    "granite": ("GraniteConfig", dict(embedding_multiplier=12.0, attention_multiplier=0.2, residual_multiplier=0.5,
                                      logits_scaling=4.0), None),
    "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=2), None),
}


def _as_published(folder, spelling: str | None) -> None:
    """Rewrite config.json the way transformers 4.x wrote it: `rope_scaling` + top-level `rope_theta` (Gemma 3:
    `rope_local_base_freq`), `torch_dtype`; "4.x-type" spells the RoPE type as `type`."""
    if spelling is None:
        return
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["torch_dtype"] = config.pop("dtype", "float32")
    rope = config.pop("rope_parameters")
    if "sliding_attention" in rope:
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    config["rope_theta"] = rope.pop("rope_theta")
    if spelling == "4.x-type":
        rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    path.write_text(json.dumps(config))


def build(tmp_path, name: str, **overrides):
    """(transformers model in fp32 with eager attention, the saved folder) of family case `name`."""
    import transformers

    from generators.weights import resolve_model_dir

    class_name, kwargs, spelling = CASES[name]
    config = getattr(transformers, class_name)(**{**COMMON, **kwargs, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from their initial values, so every trait shows
        for param_name, param in model.named_parameters():
            if param.ndim == 1:
                param.normal_(0.0, 0.3)
    folder = tmp_path / name
    model.save_pretrained(folder)
    _as_published(folder, spelling)
    tokenizer_dir = resolve_model_dir("smollm2")
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / file).exists():
            shutil.copy(tokenizer_dir / file, folder / file)
    return model, folder


def _full(model, ids: torch.Tensor, start: int = 0):
    """Full prefill of ids [1, N] at positions start..; (logits [N, V], cache)."""
    cache = model.new_cache(1, ids.shape[1])
    positions = torch.arange(start, start + ids.shape[1])
    slots = torch.arange(ids.shape[1])
    return model.forward(ids, positions[None], cache, slots, logits_rows=slice(None))[0], cache


TEXTS = ["The Severn is the longest river in Great Britain, rising in the Cambrian Mountains of Wales.",
         "Exeter College is one of the constituent colleges of the University of Oxford, founded in 1314.",
         "The Wye forms part of the border between England and Wales and flows into the Severn estuary."]


def _chunks(rag) -> list[Chunk]:
    return text_chunks(rag, TEXTS, title="Doc")


@pytest.mark.parametrize("name", list(CASES))
def test_family_is_exact_against_transformers_and_under_reuse(tmp_path, name):
    from generators.rag import RagGenerator

    hf, folder = build(tmp_path, name)
    ours = load_decoder(model_info(folder))
    ids = torch.randint(0, 2000, (1, 3 * WINDOW + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits[0]
    got, _ = _full(ours, ids)
    assert (expected - got).abs().max() < 1e-3

    # Re-rotation uses each layer's own RoPE: a sequence run Δ positions later has every layer's keys
    # rotated by Δ (attention sees relative positions only), and assembling the stored rows Δ later gives them.
    delta = 23
    _, at_zero = _full(ours, ids)
    _, shifted = _full(ours, ids, start=delta)
    for i in range(ours.args.n_layers):
        moved = rerotate(at_zero.keys[i], delta, ours.layer_rope(i))
        assert (moved - shifted.keys[i]).abs().max() < 1e-4 * shifted.keys[i].abs().max()
    entry = ChunkKV(at_zero.keys[:, 0].clone(), at_zero.values[:, 0].clone(), start=0)
    segments = [Segment(HEAD, tuple(range(7, 7 + delta))), Segment(CHUNK, tuple(ids[0].tolist()))]
    _, cache = assemble(ours, segments, {1: entry}, set(), 0)
    assert (cache.keys[:, :, :, delta:] - shifted.keys).abs().max() < 1e-4 * shifted.keys.abs().max()

    generator = {**dataclasses.asdict(GeneratorConfig()), "model": str(folder), "max_new_tokens": 16}
    rag = RagGenerator(generator, {**dataclasses.asdict(CacheConfig()), "dir": ""})
    chunks = _chunks(rag)
    question = "Which river is longest, and where does it rise?"
    full, *_ = rag.prefill(question, chunks, mode="full")
    segments = rag.prompt.segments(question, chunks)
    assert sum(len(s.token_ids) for s in segments) > 3 * WINDOW  # the prompt runs past the window
    for mode in ("blend", "query"):  # the layer-wise and the query-aware path, nothing cached
        cold, *_ = rag.prefill(question, chunks, mode=mode, ratio=1.0)
        assert (cold - full).abs().max() < 1e-3
    first = rag.answer(question, chunks, mode="prefix")  # stores every chunk behind its exact prefix
    exact, _c, _p, stats = rag.prefill(question, chunks, mode="prefix")
    assert stats["cache_hits"] == len(chunks) and stats["recomputed_tokens"] == 0
    assert (exact - full).abs().max() < 1e-3
    exact_query, _c, _p, stats = rag.prefill(question, chunks, mode="query", ratio=1.0)  # exact entries kept as is
    assert stats["cache_hits"] == len(chunks) and (exact_query - full).abs().max() < 1e-3
    rag.warm(chunks, progress=False)  # each chunk behind the head alone: later ones sit elsewhere now
    rotated_order = chunks[::-1]
    reference, *_ = rag.prefill(question, rotated_order, mode="full")
    for mode in ("blend", "query"):
        rotated, _c, _p, stats = rag.prefill(question, rotated_order, mode=mode, ratio=1.0)
        assert stats["cache_hits"] == len(chunks) and (rotated - reference).abs().max() < 1e-3

    for mode in MODES:  # every mode runs and decodes
        answer = rag.answer(question, chunks, mode=mode)
        assert answer.mode == mode and 0 < len(answer.tokens) <= 16

    # greedy decoding equals transformers' generate, 16 tokens past the prompt (and past the window)
    prompt = torch.tensor([[t for s in segments for t in s.token_ids]])
    logits, cache, next_position, _ = rag.prefill(question, chunks, mode="full")
    ours_tokens = decode(ours, cache, logits[None], torch.tensor([next_position]), 16)[0]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert ours_tokens == theirs[0, prompt.shape[1]:].tolist()
    assert first.tokens == ours_tokens[: len(first.tokens)]  # prefix reuse decodes the same answer


def test_longrope_switch_matches_transformers_and_refuses_reuse_across_it(tmp_path):
    """Phi-3's LongRoPE uses its long factors once a forward reaches past original_max_position_embeddings:
    full prefill and decoding follow transformers on both sides, and reuse refuses a prompt past the switch
    (KV stored under the short factors would be wrong there)."""
    from generators.rag import RagGenerator

    switch = 40
    hf, folder = build(tmp_path, "phi3-longrope", rope_parameters=_longrope(switch=switch),
                       original_max_position_embeddings=switch)
    ours = load_decoder(model_info(folder))
    for length in (switch - 5, switch + 20):
        ids = torch.randint(0, 2000, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = hf(ids).logits[0]
        assert (expected - _full(ours, ids)[0]).abs().max() < 1e-3
    ids = torch.randint(0, 2000, (1, switch - 4), generator=torch.Generator().manual_seed(5))
    logits, cache = _full(ours, ids)
    cache.ensure_capacity(ids.shape[1] + 12)
    ours_tokens = decode(ours, cache, logits[-1:], torch.tensor([ids.shape[1]]), 12)[0]  # crosses the switch
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours_tokens == theirs[0, ids.shape[1]:].tolist()

    generator = {**dataclasses.asdict(GeneratorConfig()), "model": str(folder), "max_new_tokens": 4}
    rag = RagGenerator(generator, {**dataclasses.asdict(CacheConfig()), "dir": ""})
    chunks = _chunks(rag)
    rag.prefill("Which river?", chunks, mode="full")  # full prefill needs no stored KV: any length runs
    with pytest.raises(ConfigError, match="LongRoPE"):
        rag.answer("Which river?", chunks, mode="blend")  # answer() stores what it computed, were it to run
    for chunk in chunks:  # nothing computed past the switch was stored
        assert rag.store.variants("float32", rag.keys.shared(chunk.token_ids).chunk_hash) == []


@pytest.mark.parametrize("change, trait", [
    ({"layer_types": ["full_attention", "linear_attention", "full_attention", "full_attention"]}, "linear_attention"),
    ({"architectures": ["Qwen3NextForCausalLM"]}, "unsupported architecture 'Qwen3NextForCausalLM'"),
    ({"model_type": "granite"}, "model_type 'granite'"),
    ({"embedding_multiplier": 12.0}, "embedding_multiplier"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}, "'dynamic'"),
])
def test_traits_ragkit_does_not_implement_are_refused_by_name(tmp_path, change, trait):
    _, folder = build(tmp_path, "qwen3")
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(InputError, match=trait):
        load_decoder(model_info(folder))


def _gguf(path, arch: str, rope_freqs=None):
    """A metadata-only GGUF (plus an optional `rope_freqs` tensor) of a 2-layer model."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(131072)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(300)
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float32))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_llama3_scaling_is_read_and_unsupported_gguf_refused_before_dequantising(tmp_path, monkeypatch):
    """Llama 3.1's GGUF stores its llama3 RoPE scaling as per-frequency factors (`rope_freqs`), which
    transformers' GGUF reader drops; ragkit recovers the parameters. An architecture ragkit does not implement
    is refused from the metadata: nothing dequantised, nothing written to the model cache."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from generators.weights import convert_gguf, gguf_config

    params = {**LLAMA3, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=params, max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    read = gguf_config(_gguf(tmp_path / "llama31.gguf", "llama", (default / scaled).tolist()))
    assert read["rope_parameters"] == {**params, "rope_theta": 500000.0}
    assert gguf_config(_gguf(tmp_path / "plain.gguf", "llama"))["rope_parameters"]["rope_type"] == "default"

    monkeypatch.setenv("RAGKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="unsupported architecture 'MambaForCausalLM'"):  # transformers reads it
        convert_gguf(_gguf(tmp_path / "mamba.gguf", "mamba"))
    with pytest.raises(InputError, match="unsupported GGUF architecture 'rwkv7'"):  # transformers does not
        convert_gguf(_gguf(tmp_path / "rwkv7.gguf", "rwkv7"))
    assert not (tmp_path / "cache").exists()


def test_models_command_describes_a_folder_and_refuses_by_name(tmp_path):
    from typer.testing import CliRunner

    from ragkit.cli import app

    _, folder = build(tmp_path, "gemma3")
    shown = CliRunner().invoke(app, ["models", str(folder)])
    assert shown.exit_code == 0
    assert "gemma3 (Gemma3ForCausalLM)" in shown.output and "layers 1,3: linear θ=1e+06 ×8" in shown.output
    assert "layers 0,2: 16; layers 1,3: none" in shown.output
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "final_logit_softcapping": None,
                                "layer_types": ["sliding_attention", "chunked_attention"] * 2}))
    refused = CliRunner().invoke(app, ["models", str(folder)])
    assert refused.exit_code == 2 and "layer type 'chunked_attention' (layer 1)" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    listed = CliRunner().invoke(app, ["models"])
    assert listed.exit_code == 0 and all(arch in listed.output for arch in ("Qwen3MoeForCausalLM", "Phi3ForCausalLM"))


GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}"
                  "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.mark.parametrize("template, head, tail", [
    (GEMMA_TEMPLATE, "<start_of_turn>user\nBe brief.\n\n", "<end_of_turn>\n<start_of_turn>model\n"),
    (LLAMA3_TEMPLATE, "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>",
     "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_prompt_comes_from_the_model_template_and_stops_on_its_declared_eos_ids(tmp_path, template, head, tail):
    """The family's own chat template frames the prompt (Gemma's, which refuses a system turn, gets it folded
    into the user turn); chunk ids stay exactly as stored; generation stops on every eos id that config.json
    and generation_config.json declare (Llama 3.1 lists three)."""
    from generators.prompt import ChatPrompt
    from generators.weights import load_tokenizer

    _, folder = build(tmp_path, "qwen3")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8, 9]}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": [11, 7]}))
    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = template
    prompt = ChatPrompt(tokenizer, "Be brief.", model_info(folder).eos_ids)
    assert head in tokenizer.decode(prompt.head_ids) and prompt.tail_text == tail
    chunk = Chunk(id="d#0", doc_id="d", text=TEXTS[0], token_ids=prompt.chunk_ids(TEXTS[0]), span=(0, 0),
                  content_hash="h")
    segments = prompt.segments("Which river?", [chunk])
    assert segments[1].token_ids == tuple(chunk.token_ids)
    assert {7, 8, 9, 11, tokenizer.eos_token_id} <= prompt.stop_ids


def test_a_model_folder_is_read_once_into_model_info(tmp_path, monkeypatch):
    """config.json is parsed once per generator (ModelInfo): the loader, the cache fingerprint and the prompt's
    eos ids all take it from there; a broken generation_config.json is refused naming the file."""
    from generators import families
    from generators.rag import RagGenerator

    _, folder = build(tmp_path, "qwen3")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    read, reads = families.read_config_json, []
    monkeypatch.setattr(families, "read_config_json", lambda path: reads.append(path.name) or read(path))
    generator = {**dataclasses.asdict(GeneratorConfig()), "model": str(folder)}
    rag = RagGenerator(generator, {**dataclasses.asdict(CacheConfig()), "dir": ""})
    assert reads == ["config.json", "generation_config.json"]
    assert 9 in rag.info.eos_ids and 9 in rag.prompt.stop_ids
    (folder / "generation_config.json").write_text("{")
    with pytest.raises(InputError, match="generation_config.json: not valid JSON"):
        model_info(folder)


def test_gemma3_multimodal_checkpoint_loads_its_text_tower(tmp_path):
    """Gemma 3 4B-27B are published as Gemma3ForConditionalGeneration: the text tower (its `text_config`, weights
    under `language_model.`) is what ragkit runs, and its logits on text equal transformers' whole model."""
    import transformers

    text = {**COMMON, "num_hidden_layers": 2, "head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=49000, boi_token_index=48999, eoi_token_index=49001)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "gemma3-mm")
    ours = load_decoder(model_info(tmp_path / "gemma3-mm"))
    assert ours.args.architecture == "Gemma3ForCausalLM" and ours.windows == [WINDOW]
    ids = torch.randint(0, 2000, (1, 2 * WINDOW + 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits[0]
    assert (expected - _full(ours, ids)[0]).abs().max() < 1e-3
