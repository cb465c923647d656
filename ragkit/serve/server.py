"""Build a server from a pipeline config and run it on uvicorn with a graceful SIGTERM.

On SIGTERM (or Ctrl-C) the server stops accepting connections, ends queued jobs with a 503
error, lets running ones finish within their deadline, then flushes the KV store's journal.
A SIGKILL leaves the cache folder as consistent as any crash does (chunk_cache/disk.py).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from ragkit.config import MODE_NAMES, check_modes
from ragkit.errors import ConfigError, RagkitError
from ragkit.pipeline import Pipeline
from ragkit.serve.app import Server, create_app
from ragkit.serve.arena import PreferenceLog
from ragkit.serve.metrics import ServeMetrics
from ragkit.serve.scheduler import EngineScheduler
from ragkit.serve.schemas import Limits
from ragkit.serve.service import PipelineService


@dataclass
class ServeOptions:
    queue: int = 16
    batch: int = 8  # requests decoded together (rows of the engine's batch)
    deadline_s: float = 120.0
    api_key: str | None = None
    max_k: int = 20
    max_tokens: int = 256
    modes: tuple[str, ...] = MODE_NAMES  # the registry's names
    arena: tuple[str, str] = ("full", "blend")
    preferences: Path | None = None  # default: <eval.runs_dir>/arena/<name>.jsonl
    max_body_bytes: int = 64 << 10
    extra: dict = field(default_factory=dict)  # further Limits fields


def build_server(pipeline: Pipeline, options: ServeOptions) -> Server:
    """Load the model and index now (not on the first request) and wire the parts together."""
    cfg = pipeline.config
    modes = tuple(options.modes)
    check_modes(modes, "serve.modes")
    check_modes(options.arena, "serve.arena")
    if len(options.arena) != 2 or not set(options.arena) <= set(modes):
        raise ConfigError("serve.arena", "needs two modes, both among the allowed modes")
    default_mode = cfg.cache.mode if cfg.cache.mode in modes else modes[0]
    limits = Limits(modes=modes, default_mode=default_mode, default_k=min(cfg.generator.chunks, options.max_k),
                    max_k=options.max_k, default_max_tokens=min(cfg.generator.max_new_tokens, options.max_tokens),
                    max_tokens=options.max_tokens, max_body_bytes=options.max_body_bytes,
                    deadline_s=options.deadline_s, **options.extra)
    service = PipelineService(pipeline, limits.max_output_chars, options.batch)
    preferences = options.preferences or Path(cfg.eval.runs_dir) / "arena" / f"{cfg.name}.jsonl"
    return Server(service=service, scheduler=EngineScheduler(service, options.queue), limits=limits,
                  api_key=options.api_key or None, arena=PreferenceLog(preferences, options.arena, cfg.name),
                  metrics=ServeMetrics(), drain_timeout_s=options.deadline_s)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, ending queued jobs as soon as shutdown starts rather than after the
    connections waiting on them have closed."""

    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.ragkit = server

    async def shutdown(self, sockets=None) -> None:
        self.ragkit.draining = True
        self.ragkit.scheduler.drain()
        await super().shutdown(sockets)


def check_listen(host: str, port: int) -> None:
    """Fail fast, before the model loads, when the address cannot be bound (in use, or no such host)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        raise RagkitError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (pick another --port or "
                          "--host)") from None


def run(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        max_connections: int = 256) -> None:
    """Serve until SIGTERM/SIGINT; beyond `max_connections` open connections uvicorn answers 503."""
    logging.getLogger("ragkit.serve").setLevel(log_level.upper())
    config = uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(server.drain_timeout_s) + 5,
                            limit_concurrency=max_connections)
    _DrainingServer(config, server).run()
