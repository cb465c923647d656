"""The LLM behind query expansion and listwise reranking: the local decoder or an endpoint, cached.

Both kinds answer `complete(messages, max_tokens)` greedily and name themselves by an `identity`
(the local model's fingerprint and dtype, or endpoint URL + model). `CachedLLM` stores every reply
on disk under sha256(identity, messages, max_tokens, temperature), so re-running an eval asks the
LLM nothing; it counts the calls it made and the replies it found. `ScoreCache` is the same store
for numbers (LLM rerank scores).

On disk: `<dir>/<aa>/<sha256>.json`, one small JSON file per entry, written atomically, so several
processes may share a folder and a killed run leaves no partial entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch

from ragkit.storage import atomic_write_json


class LLM(Protocol):
    identity: str

    def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0) -> str: ...

    def complete_many(self, prompts: list[list[dict[str, str]]], max_tokens: int,
                      temperature: float = 0.0) -> list[str]: ...


class DiskCache:
    """JSON values by the sha256 of a JSON-able key."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def digest(key: Any) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.json"

    def get(self, key: Any) -> Any | None:
        try:
            return json.loads(self._path(self.digest(key)).read_text(encoding="utf-8"))["value"]
        except (OSError, ValueError, KeyError, TypeError):  # absent, or damaged: computed again
            return None

    def put(self, key: Any, value: Any) -> None:
        path = self._path(self.digest(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"value": value})


class CachedLLM:
    """An LLM whose replies are kept on disk; `calls` counts the prompts sent to it, `hits` those found."""

    def __init__(self, llm: LLM, folder: str | Path):
        self.llm, self.cache = llm, DiskCache(folder)
        self.identity = llm.identity
        self.calls = self.hits = 0

    def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0) -> str:
        return self.complete_many([messages], max_tokens, temperature)[0]

    def complete_many(self, prompts: list[list[dict[str, str]]], max_tokens: int,
                      temperature: float = 0.0) -> list[str]:
        keys = [["chat", self.identity, p, max_tokens, temperature] for p in prompts]
        replies = [self.cache.get(k) for k in keys]
        todo = [i for i, r in enumerate(replies) if r is None]
        self.hits += len(prompts) - len(todo)
        if todo:
            self.calls += len(todo)
            fresh = self.llm.complete_many([prompts[i] for i in todo], max_tokens, temperature)
            for i, reply in zip(todo, fresh):
                self.cache.put(keys[i], reply)
                replies[i] = reply
        return replies


class LocalLLM:
    """Chat completion with the local decoder: the chat template over the messages, full prefill, greedy
    (or sampled) decoding. `rag` is a generators.rag.RagGenerator (its model, tokenizer and sampling)."""

    def __init__(self, rag):
        self.rag = rag
        self.identity = f"local:{rag.fingerprint}:{rag.keys.dtype}"

    @torch.inference_mode()
    def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0) -> str:
        from generators.generate import Sampling, decode

        tokenizer = self.rag.prompt.tokenizer
        ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
        model = self.rag.model
        cache = model.new_cache(1, len(ids) + max_tokens + 1)
        positions = torch.arange(len(ids), device=model.device)
        logits = model.forward(torch.tensor([ids], device=model.device), positions[None], cache, positions)[:, -1]
        next_positions = torch.tensor([len(ids)], device=model.device)
        sampling = Sampling(temperature, self.rag.sampling.top_p, self.rag.sampling.seed)
        tokens = decode(self.rag.model, cache, logits, next_positions, max_tokens, self.rag.prompt.stop_ids,
                        sampling)[0]
        return tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def complete_many(self, prompts: list[list[dict[str, str]]], max_tokens: int,
                      temperature: float = 0.0) -> list[str]:
        return [self.complete(p, max_tokens, temperature) for p in prompts]
