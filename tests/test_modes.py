"""The reuse path's shape: one registry of modes, one facade that reads top to bottom, a typed decoder
Protocol, no flag on the model; and the static rules (EPIC, Cache-Craft) and Cache-Craft's overlap."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

from chunk_cache.craft import ChunkStatistics, overlap, stat_layers
from chunk_cache.modes import MODES, Candidates, ReusedChunk, ReuseSettings, make_mode
from ragkit.config import CacheConfig, GeneratorConfig
from ragkit.errors import ConfigError
from tests.conftest import text_chunks, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("ragkit", "chunk_cache", "generators", "retrievers", "eval") for p in (ROOT / d).rglob("*.py")]


def test_the_readme_table_is_the_registry():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| mode | what runs at query time |"):].split("\n\n")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", table, re.MULTILINE))
    assert {name: rows.get(name) for name in MODES} == {name: mode.summary for name, mode in MODES.items()}


def test_mode_names_are_listed_once():
    """No other literal lists the modes (config, CLI and --help read chunk_cache.modes); a few names chosen
    for a purpose (a benchmark's default selection) are not a copy of the registry."""
    names = set(MODES)
    for path in SOURCES:
        if path.name == "modes.py" and path.parent.name == "chunk_cache":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                values = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                assert len(values & names) <= len(names) // 2, f"{path.relative_to(ROOT)}:{node.lineno} lists modes"


def test_no_component_sets_state_on_the_model():
    """Per-request settings (APE's temperature and scale) ride on the cache, never on a shared decoder
    (which only sets its own attributes where it is built, in generators/model.py)."""
    for path in [*(ROOT / "chunk_cache").glob("*.py"), *(ROOT / "generators").glob("*.py")]:
        if path.name == "model.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and ast.unparse(target.value) in ("model", "self.model"):
                        pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} sets {ast.unparse(target)}")


def test_unknown_mode_names_the_key_and_the_registry():
    with pytest.raises(ConfigError, match="cache.mode.*magic.*full.*cacheblend"):
        make_mode("magic")


def test_epic_recomputes_the_first_rows_of_each_inexact_chunk():
    candidates = Candidates(30, [ReusedChunk(5, 12, {}, 0.0), ReusedChunk(20, 22, {}, 1.0)])
    rows = MODES["epic"].static(candidates, ReuseSettings(mode="epic", epic_tokens=3))
    assert rows.nonzero()[:, 0].tolist() == [5, 6, 7, 20, 21]


def test_craft_recomputes_cfo_share_by_inter_attention():
    inter = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.8, 0.0, 0.3, 0.4, 0.6, 0.7])
    chunk = ReusedChunk(10, 20, {"inter": inter, "cci": torch.tensor([0.5])}, overlap=0.2)
    rows = MODES["craft"].static(Candidates(25, [chunk]), ReuseSettings(mode="craft", craft_alpha=1.0))
    assert sorted(rows.nonzero()[:, 0].tolist()) == [11, 14, 18, 19]  # ceil(0.5 * 0.8 * 10) = 4 most attending
    chunk.overlap = 1.0  # its whole stored context is in front of it again: reuse as is
    assert not MODES["craft"].static(Candidates(25, [chunk]), ReuseSettings(mode="craft")).any()
    bare = ReusedChunk(0, 6, {}, 0.0)  # no statistics: fully context-dependent, first rows in order
    assert MODES["craft"].static(Candidates(6, [bare]), ReuseSettings(mode="craft", craft_alpha=0.5)).tolist() == \
        [True, True, True, False, False, False]


def test_cacheblend_filters_gradually_and_blend_checks_once():
    settings = ReuseSettings(ratio=0.15, full_layers=2)
    assert MODES["cacheblend"].layerwise.checks(settings) == [(1, 0.3), (2, 0.15)]
    assert MODES["blend"].layerwise.checks(settings) == [(2, 0.15)]


def test_overlap_is_weighted_by_stored_inter_attention_and_penalised_for_order():
    stored = ("a", "b", "c")
    weights = torch.tensor([1.0, 2.0, 1.0])
    assert overlap(stored, weights, ["a", "b", "c"]) == 1.0
    assert overlap(stored, weights, ["x", "b"]) == pytest.approx(0.5)  # b carried half the inter-attention
    assert overlap(stored, weights, ["b", "a"]) == pytest.approx(0.75 * (1 - 1.0))  # the pair is reversed
    assert overlap(stored, None, ["a", "c", "z"]) == pytest.approx(2 / 3)  # no statistics: chunks count alike
    assert overlap((), None, []) == 1.0 and overlap((), None, ["a"]) == 0.0


def test_statistics_span_the_whole_cci_range():
    outward = ChunkStatistics((4, 6), [(1, 4)])
    inward = ChunkStatistics((4, 6), [(1, 4)])
    for _ in range(2):
        probs = torch.zeros(2, 6)
        probs[:, 1:4] = 1 / 3
        outward.add(probs)
        probs = torch.zeros(2, 6)
        probs[:, 4:6] = 0.5
        inward.add(probs)
    assert float(outward.extras()["cci"]) == 1.0 and float(inward.extras()["cci"]) == 0.0
    assert outward.extras()["inter"].tolist() == [1.0, 1.0] and stat_layers(30) == [0, 14, 29]


@pytest.fixture(scope="module")
def tiny_rag(tmp_path_factory):
    from generators.rag import RagGenerator

    folder = tiny_llama(tmp_path_factory.mktemp("modes") / "model")
    generator = {**dataclasses.asdict(GeneratorConfig()), "model": str(folder), "max_new_tokens": 3}
    return RagGenerator(generator, {**dataclasses.asdict(CacheConfig()), "dir": ""})


def _chunks(rag, texts):
    return text_chunks(rag, texts)


def test_the_cache_path_reads_through_three_files(tiny_rag, monkeypatch):
    """From the generator to the stored entry: generators/rag.py -> chunk_cache/reuse.py -> chunk_cache/store.py,
    for lookups (plan) and stores (commit) alike, in plan -> assemble -> recompute -> commit order."""
    from chunk_cache.reuse import ChunkReuse
    from chunk_cache.store import KVStore

    steps, paths = [], []
    for step in ("plan", "assemble", "recompute", "commit"):
        original = getattr(ChunkReuse, step)
        monkeypatch.setattr(ChunkReuse, step, lambda self, *a, _o=original, _s=step, **k: steps.append(_s) or
                            _o(self, *a, **k))

    def stack_files() -> None:
        files = [Path(f.filename).resolve() for f in inspect.stack()[1:]]
        project = [f.relative_to(ROOT).as_posix() for f in files if f.is_relative_to(ROOT)
                   and "tests" not in f.parts]
        start = project.index("generators/rag.py")
        paths.append(list(dict.fromkeys(reversed(project[:start + 1]))))

    for name in ("get", "put"):
        original = getattr(KVStore, name)
        monkeypatch.setattr(KVStore, name, lambda self, *a, _o=original, **k: stack_files() or _o(self, *a, **k))
    texts = ["Exeter College is in Oxford.", "The Thames flows through Oxford.", "Rivers carry boats."]
    tiny_rag.answer("Where is Exeter College?", _chunks(tiny_rag, texts), mode="blend")
    assert steps == ["plan", "assemble", "recompute", "commit"]
    assert paths and all(p == ["generators/rag.py", "chunk_cache/reuse.py"] for p in paths)  # then KVStore


def test_the_decoder_satisfies_the_reuse_protocol(tiny_rag):
    from chunk_cache.decoder import ReuseDecoder

    members = {name for name in dir(ReuseDecoder) if not name.startswith("_")} | set(ReuseDecoder.__annotations__)
    missing = [name for name in members if not hasattr(tiny_rag.model, name)]
    assert not missing and members >= {"qkv", "finish", "masks_for", "logits", "layer_rope", "embed_tokens"}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_answers_and_keeps_recompute_in_range(tiny_rag, mode):
    chunks = _chunks(tiny_rag, ["Exeter College is in Oxford.", "The Thames flows through Oxford.",
                                "Rivers carry boats past colleges."])
    tiny_rag.warm(chunks, progress=False)
    logits, cache, _position, stats = tiny_rag.prefill("Where is Exeter College?", chunks[::-1], mode=mode)
    assert torch.isfinite(logits).all() and 0.0 <= stats["recompute_share"] <= 1.0
    assert stats["cache_hits"] == (0 if mode in ("full", "prefix") else 3)  # titles: no chunk is an exact prefix
    assert (cache.ape is not None) == (mode == "ape")  # APE's state lives on this request's cache only
    full, _ = tiny_rag.teacher_force("Where is Exeter College?", chunks[::-1], [1, 2], mode="full")
    if mode in ("full", "prefix"):
        assert (full - logits).abs().max() < 1e-4


def test_ape_keeps_titles_and_separators_in_each_context(tiny_rag):
    from chunk_cache.assembly import TITLE, assemble

    chunks = _chunks(tiny_rag, ["Exeter College is in Oxford.", "The Thames flows through Oxford today."])
    segments = tiny_rag.prompt.segments("Where?", chunks)
    layout, _cache = assemble(tiny_rag.model, segments, {}, set(), 0, parallel=True)
    title_rows = [layout.spans[i][0] for i, seg in enumerate(segments) if seg.kind == TITLE]
    head_end = layout.spans[0][1]
    assert [int(layout.positions[r]) for r in title_rows] == [head_end, head_end]  # both contexts restart there
    assert layout.group[title_rows].tolist() == [0, 1]
    last = layout.spans[-2]  # the separator after the second chunk belongs to its context
    assert layout.group[last[0]: last[1]].tolist() == [1] * (last[1] - last[0])
    question = layout.spans[-1][0]
    assert int(layout.positions[question]) == max(int(layout.positions[s[1] - 1]) for s in layout.spans[:-1]) + 1


def test_a_tail_behind_an_exact_prefix_may_use_the_lower_right_causal_kernel(tiny_rag, monkeypatch):
    """Prefix mode's tail runs through SDPA's lower-right causal kernel where it is native (CUDA); forced on
    here, it computes what per-block position masks compute."""
    from torch.nn.attention.bias import CausalBias

    from generators import model as model_module

    chunks = [dataclasses.replace(c, title="") for c in  # no title rows between the head and the first chunk
              _chunks(tiny_rag, ["A tail test passage on the Severn.", "Another tail test passage on the Wye."])]
    # The first chunk stored behind exactly what precedes it (a prompt that finds nothing but the head runs as
    # one causal prefill from row 0 instead): everything after it is the tail.
    tiny_rag.answer("Which river is this?", chunks[:1], mode="prefix")
    blocks, _cache, _position, stats = tiny_rag.prefill("Where is Exeter College?", chunks, mode="prefix")
    assert stats["cache_hits"] == 1
    seen = []
    original = model_module.Decoder.masks_for
    monkeypatch.setattr(model_module, "TAIL_KERNEL_DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(model_module.Decoder, "masks_for",
                        lambda self, *a, **k: seen.append(original(self, *a, **k)) or seen[-1])
    tail, *_ = tiny_rag.prefill("Where is Exeter College?", chunks, mode="prefix")
    assert any(isinstance(m, CausalBias) for m in seen)
    assert (tail - blocks).abs().max() < 1e-4
