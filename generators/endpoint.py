"""An OpenAI-compatible chat endpoint as the LLM: vLLM, SGLang, llama.cpp's server, `ragkit serve`.

Only `POST {base_url}/chat/completions` is used, through httpx. The API key is read from the
environment variable the config names, never from the config itself. A request that fails (no
connection, a timeout, a 5xx or 429, a body that is not a chat completion) is retried with
exponential backoff (0.5 s, 1 s, 2 s, ...); after the last retry one EndpointError names the URL and
the last failure. A 4xx other than 429 is the request's fault and is not retried. `complete_many`
keeps up to `concurrency` requests in flight and returns the replies in input order. With
`whole_prompt` (answers: the RAG prompt is sent whole) a `ragkit serve` endpoint is told `k: 0`, so
that it answers the messages as they are instead of retrieving for them.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from ragkit.errors import EndpointError

BACKOFF_S = 0.5


class EndpointLLM:
    def __init__(self, base_url: str, model: str = "", api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 timeout: float = 60.0, retries: int = 3, whole_prompt: bool = False):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.concurrency, self.retries = concurrency, retries
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.requests = 0  # HTTP requests sent, retries included
        # `ragkit serve` retrieves for a chat unless told k=0; other servers get no extra field
        self.extra_body = {"k": 0} if whole_prompt and self._is_ragkit(base_url) else {}

    def _is_ragkit(self, base_url: str) -> bool:
        """Whether the endpoint is `ragkit serve` (its /models says owned_by "ragkit"); unreachable: no."""
        try:
            models = self.client.get(base_url.rstrip("/") + "/models").json()["data"]
            return any(m.get("owned_by") == "ragkit" for m in models)
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return False

    @property
    def identity(self) -> str:
        """What a cached reply is keyed by: the endpoint and the model it serves."""
        return f"endpoint:{self.url}|model:{self.model}"

    def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0) -> str:
        """The assistant's reply to `messages` (greedy by default)."""
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                                "stream": False, **self.extra_body}
        if self.model:
            body["model"] = self.model
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            self.requests += 1
            try:
                response = self.client.post(self.url, json=body)
            except httpx.TimeoutException:
                problem = f"no reply within {self.client.timeout.read}s (llm.timeout)"
                continue
            except httpx.HTTPError as exc:
                problem = f"cannot connect ({type(exc).__name__}: {exc})"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}: {response.text[:200]!r}"
                continue
            if response.status_code >= 400:
                raise EndpointError(f"{self.url}: HTTP {response.status_code}, the endpoint refused the request: "
                                    f"{response.text[:300]!r} (check llm.model and the API key in ${self.api_key_env})")
            try:
                return _reply_text(response.json())
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                problem = f"not a chat completion ({type(exc).__name__}: {exc}): {response.text[:200]!r}"
        raise EndpointError(f"{self.url}: failed after {self.retries + 1} attempts; last: {problem}")

    def complete_many(self, prompts: list[list[dict[str, str]]], max_tokens: int,
                      temperature: float = 0.0) -> list[str]:
        """Replies in input order, up to `concurrency` requests at a time; the first failure stops the rest."""
        if len(prompts) <= 1 or self.concurrency == 1:
            return [self.complete(p, max_tokens, temperature) for p in prompts]
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self.complete, p, max_tokens, temperature) for p in prompts]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def close(self) -> None:
        self.client.close()


def _reply_text(body: Any) -> str:
    content = body["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise TypeError(f"message.content is {type(content).__name__}, not a string")
    return content
