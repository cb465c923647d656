"""What every `ragkit` command shares: user errors as one line and exit code 2, JSON output, opening a
Pipeline from a TOML file and `--set` overrides, and the options that many commands take."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from ragkit.errors import EXIT_USAGE, RagkitError

ConfigArg = typer.Argument(..., help="Pipeline TOML file, e.g. configs/scifact-bm25.toml.", show_default=False)
SetOpt = typer.Option(None, "--set", "-s", help="Override one config key, e.g. --set retrieval.k=50 (repeatable).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
JsonOpt = typer.Option(False, "--json", help="Print the results object as JSON on stdout.")
SkipOpt = typer.Option(False, "--skip-bad-lines", help="Skip malformed corpus/query/qrels lines (counted and "
                       "reported) instead of stopping at the first one.")


def user_errors(func: Callable) -> Callable:
    """Turn RagkitError, and the file system refusing a read or write (a folder that is a file, no
    permission, a full disk), into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except RagkitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            problem = "a file where a folder is needed" if isinstance(exc, (FileExistsError, NotADirectoryError)) \
                else exc.strerror or str(exc)
            typer.echo(f"error: {where}{problem} (check the paths in the config and free disk space)", err=True)
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper


def open_pipeline(config: Path, overrides: Optional[List[str]], quiet: bool = False, skip_bad_lines: bool = False):
    from ragkit.config import parse_overrides
    from ragkit.pipeline import Pipeline

    if quiet:  # also silences the bars of libraries underneath (sentence-transformers, datasets)
        os.environ["TQDM_DISABLE"] = "1"
    return Pipeline.from_config(config, overrides=parse_overrides(overrides or []), progress=not quiet,
                                skip_bad_lines=skip_bad_lines)


def load(config: Path, overrides: Optional[List[str]]):
    """The validated config alone (no Pipeline)."""
    from ragkit.config import load_config, parse_overrides

    return load_config(config, parse_overrides(overrides or []))


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def emit(result: dict, as_json: bool, format_report: Callable[[dict], str]) -> None:
    """A result as JSON on stdout, or as its human-readable table."""
    if as_json:
        print_json(result)
    else:
        typer.echo(format_report(result))


def log(message: str) -> None:
    typer.echo(message, err=True)


def modes_option() -> Callable[[Optional[str]], Optional[str]]:
    """A typer callback checking comma-separated reuse modes against the registry (ragkit.config)."""

    def check(value: Optional[str]) -> Optional[str]:
        from ragkit.config import check_modes
        from ragkit.errors import ConfigError

        if value is not None:
            try:
                check_modes(value, "--modes")
            except ConfigError as exc:
                raise typer.BadParameter(str(exc).removeprefix("config key '--modes': ")) from None
        return value

    return check
