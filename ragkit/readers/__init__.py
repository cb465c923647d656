"""Corpus readers: every supported format becomes one `Dataset` (document stream, queries, qrels).

`open_dataset` is the single entry point the Pipeline uses; the format modules can also be
used on their own (`read_qrels_tsv`, `read_qrels_trec`, `read_musique`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

from ragkit.config import DATASET_FORMATS, DatasetConfig
from ragkit.errors import ConfigError, InputError
from ragkit.readers.beir import open_beir, open_jsonl
from ragkit.readers.bright import open_bright
from ragkit.readers.coir import open_coir
from ragkit.readers.dataset import Dataset
from ragkit.readers.hub import hub_id
from ragkit.readers.lines import BadLines
from ragkit.readers.musique import read_musique
from ragkit.readers.qrels import read_qrels_trec, read_qrels_tsv
from ragkit.readers.textdir import open_textdir
from ragkit.types import Document


def open_dataset(cfg: DatasetConfig, path: Path, skip_bad_lines: bool = False) -> Dataset:
    """Open the dataset `cfg` describes at the resolved `path`.

    For bright and coir, a `path` that does not exist locally is read as a Hugging Face
    dataset id taken from `cfg.path` (e.g. `xlangai/BRIGHT`, `CoIR-Retrieval`).
    With `cfg.title` false the documents come without titles, so nothing indexes them.
    """
    dataset = _open(cfg, Path(path), BadLines(skip_bad_lines))
    if not cfg.title:
        dataset.documents = _without_titles(dataset.documents)
    return dataset


def _open(cfg: DatasetConfig, path: Path, bad: BadLines) -> Dataset:
    limit = cfg.limit_queries
    if cfg.format in ("beir", "jsonl", "textdir"):
        if not path.exists():
            raise InputError(path, "dataset path not found", hint="check [dataset] path (relative to the config file)")
        opener = {"beir": open_beir, "jsonl": open_jsonl, "textdir": open_textdir}[cfg.format]
        return opener(path, cfg.split, bad, limit)
    repo = None if path.exists() else hub_id(cfg.path)
    if cfg.format == "bright":
        return open_bright(path, repo, cfg.domain, cfg.long_documents, bad, limit)
    if cfg.format == "coir":
        return open_coir(path, repo, cfg.task, cfg.split, bad, limit)
    raise ConfigError("dataset.format", f"unknown value {cfg.format!r}", allowed=DATASET_FORMATS)


def _without_titles(documents: Callable[[], Iterator[Document]]) -> Callable[[], Iterator[Document]]:
    """`title = false` (the CoIR protocol): retrievers index only the text, so titles are dropped here."""
    return lambda: (dataclasses.replace(doc, title="") if doc.title else doc for doc in documents())


__all__ = ["BadLines", "Dataset", "open_dataset", "read_musique", "read_qrels_trec", "read_qrels_tsv"]
