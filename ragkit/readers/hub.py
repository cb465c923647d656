"""Hugging Face hub datasets through `datasets`, offline from the local cache when the hub is unreachable.

Rows are handed on as records named `hf://<repo>/<config>/<split>` (`<folder>/<config>/<split>`
for a local copy of a hub repo) with 1-based row numbers, so a bad row reads like a bad line
in a local file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from ragkit.errors import InputError

_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?/?$")


def hub_id(raw_path: str) -> str | None:
    """'xlangai/BRIGHT' or 'hf://xlangai/BRIGHT' -> 'xlangai/BRIGHT'; None if it does not look like a hub id."""
    if not _HUB_ID.match(raw_path):
        return None
    return raw_path.removeprefix("hf://").rstrip("/")


class HubSplit:
    """One split of one hub dataset, loaded once (memory-mapped Arrow) and iterable many times."""

    def __init__(self, repo: str, config: str | None, split: str):
        prefix = "" if Path(repo).is_dir() else "hf://"
        self.where = f"{prefix}{repo}/{config or 'default'}/{split}"
        try:
            import datasets

            self.rows = datasets.load_dataset(repo, config, split=split)
        # `datasets` signals a missing repo, config, split or cache with many exception types;
        # each means the same to the user: this data is not available here.
        except Exception as exc:  # noqa: BLE001
            raise InputError(self.where, f"cannot load from the Hugging Face hub or its local cache "
                                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                             hint="download it once with network access (it is then cached; "
                                  "HF_HUB_OFFLINE=1 reads the cache without network retries), "
                                  "or point [dataset] path to a local folder") from None

    @property
    def fingerprint(self) -> str:
        return str(getattr(self.rows, "_fingerprint", "") or self.where)[:16]

    def records(self) -> Iterator[tuple[str, int, Mapping[str, Any]]]:
        for row_no, row in enumerate(self.rows, 1):
            yield self.where, row_no, row
