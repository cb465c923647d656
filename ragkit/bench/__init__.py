"""Benchmarks: `ragkit bench ...` (commands.py), one module per bench; each returns a result dict and formats
it side by side. A new benchmark is one module here with `run(settings, options) -> dict` and
`format_report(result) -> str`, plus its command in commands.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class BenchOptions:
    """What every bench runs with beside its own settings: torch threads, and where progress lines go."""

    threads: int = 1
    log: Callable[[str], None] = field(default=lambda _message: None)
