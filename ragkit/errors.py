"""Errors that users cause and can fix. The CLI prints them as one line and exits with 2.

Every message names where the problem is (file and line, or config key) and what to do.
Components raise these too; anything else reaching the CLI is a ragkit bug.
"""

from __future__ import annotations

from pathlib import Path

EXIT_USAGE = 2


class RagkitError(Exception):
    """Base class: a problem with the user's input, config or environment."""

    exit_code = EXIT_USAGE


class InputError(RagkitError):
    """Bad data in a file: names the file and, where known, the line."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None, hint: str | None = None):
        self.path = str(path)
        self.line = line
        self.problem = problem
        self.hint = hint
        where = f"{self.path}:{line}" if line is not None else self.path
        message = f"{where}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class ConfigError(RagkitError):
    """A bad config value: names the key, and the allowed values where there is a list."""

    def __init__(self, key: str, problem: str, allowed: list[str] | None = None, source: str | Path | None = None):
        self.key = key
        self.allowed = allowed
        self._args = (key, problem, allowed, source)
        prefix = f"{source}: " if source else ""
        message = f"{prefix}config key '{key}': {problem}"
        if allowed:
            message += f"; allowed: {', '.join(map(str, allowed))}"
        super().__init__(message)

    def __reduce__(self):
        """Pickle by the constructor's arguments, so a build in a child process or a Ray task raises it back."""
        return (type(self), self._args)


class IndexMismatchError(RagkitError):
    """A saved index or cache that was built for something else (corpus, model, version)."""


class EndpointError(RagkitError):
    """An LLM endpoint that stayed down, failing or unreadable after every retry: names the URL."""
