"""MuSiQue-style RAG samples (CacheBlend's `musique_s.json`): question, gold answers, fixed contexts.

Gold answers are `answers` (CacheBlend's layout) or MuSiQue's own `answer`, each followed by
its `answer_aliases` when present: scoring takes the best over all of them.

The file is one JSON list (optionally gzipped), small enough to load whole. Entries are
checked so the generator bench fails on a bad entry with its position, not mid-run.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

from ragkit.errors import InputError


def _load(path: Path) -> Any:
    try:
        raw = gzip.open(path, "rb").read() if path.name.endswith(".gz") else path.read_bytes()
        return json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InputError(path, f"broken gzip data: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not valid UTF-8 at byte {exc.start}", hint="re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg} at column {exc.colno})", exc.lineno) from None


def read_musique(path: str | Path) -> list[dict[str, Any]]:
    """[{id, question, answers: [str, ...], ctxs: [{title, text}, ...]}, ...] in file order; id = 0-based position."""
    path = Path(path)
    data = _load(path)
    if not isinstance(data, list) or not data:
        raise InputError(path, "expected a non-empty JSON list of {question, answers, ctxs} objects")
    samples = []
    for n, entry in enumerate(data):
        where = f"entry {n}"
        if not isinstance(entry, dict):
            raise InputError(path, f"{where}: expected an object")
        question, ctxs = entry.get("question"), entry.get("ctxs")
        answers, aliases = entry["answers"] if "answers" in entry else [entry.get("answer")], \
            entry.get("answer_aliases", [])
        answers = answers + aliases if isinstance(answers, list) and isinstance(aliases, list) else None
        if not isinstance(question, str) or not question.strip():
            raise InputError(path, f"{where}: 'question' must be a non-empty string")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise InputError(path, f"{where}: 'answers' must be a non-empty list of strings (or give 'answer' "
                             "and a list 'answer_aliases')")
        if not isinstance(ctxs, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                                 for c in ctxs):
            raise InputError(path, f"{where}: 'ctxs' must be a list of objects with a 'text' string")
        samples.append({"id": str(n), "question": question, "answers": list(answers),
                        "ctxs": [{"title": str(c.get("title") or ""), "text": c["text"]} for c in ctxs]})
    return samples
