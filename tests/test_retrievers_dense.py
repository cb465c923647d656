"""Dense retrieval with the real all-MiniLM-L6-v2 encoder on a handful of texts, and the
embedding cache: re-indexing embeds only new or changed chunks."""

from __future__ import annotations

import numpy as np
import pytest

import retrievers
from ragkit.types import Chunk

pytestmark = pytest.mark.slow

TEXTS = {
    "bio": "Aspirin lowers the risk of myocardial infarction in adults.",
    "code": "def add(a, b): return a + b  # adds two integers in Python",
    "geo": "Mount Everest is the highest mountain above sea level.",
    "sport": "The football team won the championship final on penalties.",
}


def chunk(cid: str, text: str) -> Chunk:
    return Chunk(id=cid, doc_id=cid, text=text, token_ids=(), span=(0, len(text)), content_hash="",
                 metadata={"kind": cid})


def test_minilm_ranks_the_relevant_text_first_and_cache_embeds_only_changes(tmp_path):
    spec = {"type": "dense", "cache_dir": str(tmp_path / "emb"), "device": "cpu"}
    r = retrievers.build(spec)
    r.index(chunk(cid, text) for cid, text in TEXTS.items())
    assert r.last_encoded == len(TEXTS)
    hits = r.search(["which drug prevents heart attacks", "tallest peak in the world"], 2)
    assert [h[0].id for h in hits] == ["bio", "geo"]
    assert hits[0][0].score == pytest.approx(float(r.vectors[r.slot_of["bio"]] @ r.encoder.encode(
        ["which drug prevents heart attacks"], "query")[0]), rel=1e-5)
    assert np.allclose(np.linalg.norm(r.vectors, axis=1), 1.0, atol=1e-5)

    again = retrievers.build(spec)
    again.index(chunk(cid, text) for cid, text in TEXTS.items())
    assert again.last_encoded == 0
    again.add([chunk("sport", "Tennis players serve at over 200 km/h.")])
    assert again.last_encoded == 1
    assert again.search(["tallest peak in the world"], 1, filter={"kind": ["sport", "bio"]})[0][0].id in {"sport", "bio"}

    other = retrievers.build({**spec, "max_length": 32})  # another encoder setting: its own cache entries
    other.index([chunk("geo", TEXTS["geo"])])
    assert other.last_encoded == 1
