"""Cache entries are portable: the model fingerprint comes from content, so the same weights at another
path, after a copy or a re-conversion, hit the same entries; changed weights or decoder version do not."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from generators import weights
from generators.weights import model_fingerprint, model_info
from ragkit.config import CacheConfig, GeneratorConfig
from ragkit.types import Chunk, token_hash


def _folder(root: Path, value: float = 1.0, **config) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4,
                                                  "transformers_version": "5.0", **config}))
    save_file({"w": torch.full((4, 4), value)}, str(root / "model.safetensors"))
    return root


def _fingerprint(folder: Path, dtype=torch.float32) -> str:
    return model_fingerprint(model_info(folder), dtype)


def test_fingerprint_depends_on_content_not_on_where_or_when(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGKIT_CACHE", str(tmp_path / "cache"))
    original = _folder(tmp_path / "a")
    elsewhere = _folder(tmp_path / "b", transformers_version="5.9")  # written again by another transformers
    copied = tmp_path / "c"
    shutil.copytree(tmp_path / "a", copied)
    assert _fingerprint(original) == _fingerprint(elsewhere) == _fingerprint(copied)
    assert _fingerprint(_folder(tmp_path / "d", value=1.5)) != _fingerprint(original)  # other weights
    assert _fingerprint(_folder(tmp_path / "e", hidden_size=8)) != _fingerprint(original)
    assert _fingerprint(original, torch.bfloat16) != _fingerprint(original)
    before = _fingerprint(original)
    monkeypatch.setattr(weights, "KV_LAYOUT_VERSION", weights.KV_LAYOUT_VERSION + 1)  # a decoder change
    assert _fingerprint(original) != before


def test_weight_digests_are_remembered_per_file_version(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGKIT_CACHE", str(tmp_path / "cache"))
    model = _folder(tmp_path / "a")
    first = _fingerprint(model)
    sidecar = json.loads((tmp_path / "cache" / "weight-digests.json").read_text())
    assert len(sidecar) == 1
    calls = []
    monkeypatch.setattr(weights, "hash_file", lambda path, digest: calls.append(path) or "x")
    assert _fingerprint(model) == first and calls == []  # remembered: no second read of the weights
    save_file({"w": torch.full((4, 4), 2.0)}, str(tmp_path / "a" / "model.safetensors"))  # a new file version
    _fingerprint(model)
    assert len(calls) == 1


@pytest.mark.slow
def test_a_copied_cache_folder_hits_after_the_model_is_converted_again_elsewhere(tmp_path, monkeypatch):
    """Two virtual environments on one machine (or two machines) each convert the bundled GGUF into their
    own folder; a cache warmed through the first is hit through the second."""
    from generators.rag import RagGenerator

    generator = {**dataclasses.asdict(GeneratorConfig()), "max_new_tokens": 2}

    def make(cache_dir: Path, ragkit_cache: Path) -> RagGenerator:
        monkeypatch.setenv("RAGKIT_CACHE", str(ragkit_cache))
        return RagGenerator(generator, {**dataclasses.asdict(CacheConfig()), "dir": str(cache_dir)})

    first = make(tmp_path / "kv", tmp_path / "env-a")
    ids = first.prompt.chunk_ids("Exeter College is a constituent college of the University of Oxford.")
    chunk = Chunk(id="d#0", doc_id="d", text="", token_ids=ids, span=(0, 0), content_hash=token_hash(ids))
    assert first.warm([chunk], progress=False) == 1
    shutil.copytree(tmp_path / "kv", tmp_path / "copied")
    second = make(tmp_path / "copied", tmp_path / "env-b")  # converts the GGUF again, into env-b
    assert second.info.folder != first.info.folder and second.fingerprint == first.fingerprint
    assert second.warm([chunk], progress=False) == 0  # already cached
    answer = second.answer("Where is Exeter College?", [chunk], mode="naive")
    assert answer.cache_hits == 1 and answer.recomputed_tokens == 0
