"""Shared fixtures: a word-level tokenizer with offsets (fast, no model) and the real one."""

from __future__ import annotations

import re

import pytest


class WordTokenizer:
    """Splits on whitespace-prefixed words, like a byte-level BPE keeps leading spaces."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=True):
        ids, offsets = [], []
        for text in texts:
            spans = [(m.start(), m.end()) for m in re.finditer(r"\s*\S+", text)]
            ids.append([self.vocab.setdefault(text[a:b].strip(), len(self.vocab)) for a, b in spans])
            offsets.append(spans)
        return {"input_ids": ids, "offset_mapping": offsets}


@pytest.fixture
def word_tokenizer():
    return WordTokenizer()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from generators.weights import load_tokenizer

    return load_tokenizer("smollm2")


def tiny_llama(folder, layers: int = 2, init_range: float = 0.02):
    """A random Llama (2 layers unless told) with SmolLM2's tokenizer in `folder`: the decoder and the cache do
    not care what the tensors mean, and it runs a prompt in milliseconds. At the default `init_range` its
    attention is nearly uniform; a larger one makes the logits depend on every position."""
    import shutil

    import torch
    import transformers

    from generators.weights import resolve_model_dir

    tokenizer_dir = resolve_model_dir("smollm2")
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      tie_word_embeddings=True, initializer_range=init_range)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def text_chunks(rag, texts, title: str = "Title"):
    """One titled chunk per text ("{title} {i}"; "" for none), tokenized by `rag`'s prompt: the passages
    the generator tests reuse."""
    from ragkit.types import Chunk, token_hash

    out = []
    for i, text in enumerate(texts):
        ids = rag.prompt.chunk_ids(text)
        out.append(Chunk(id=f"d{i}#0", doc_id=f"d{i}", text=text, token_ids=ids, span=(0, 0),
                         content_hash=token_hash(ids), title=f"{title} {i}" if title else ""))
    return out
