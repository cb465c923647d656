"""Layer-by-layer upload of reused KV (chunk_cache.upload): the cache it assembles is the one an
all-at-once copy gives, and every layer waits for its own rows before it touches them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chunk_cache.assembly import assemble
from chunk_cache.modes import MODES
from chunk_cache.rope import rerotate
from generators.generate import decode
from ragkit.config import CacheConfig, GeneratorConfig
from ragkit.types import Chunk, token_hash
from tests.conftest import tiny_llama

QUESTION = "Where is Exeter College?"
TEXTS = ["Exeter College is in Oxford.", "The Thames flows through Oxford.", "Rivers carry boats past colleges."]


@pytest.fixture(scope="module")
def rag(tmp_path_factory):
    from generators.rag import RagGenerator

    folder = tiny_llama(tmp_path_factory.mktemp("upload") / "model", layers=4)
    generator = {**dataclasses.asdict(GeneratorConfig()), "model": str(folder), "max_new_tokens": 4}
    rag = RagGenerator(generator, {**dataclasses.asdict(CacheConfig()), "dir": ""})
    chunks = _chunks(rag)
    for mode in MODES:  # every kind of entry: shared, exact behind the chunks before, with statistics
        rag.answer(QUESTION, chunks, mode=mode)
    return rag


def _chunks(rag) -> list[Chunk]:
    out = []
    for i, text in enumerate(TEXTS):
        ids = rag.prompt.chunk_ids(text)
        out.append(Chunk(id=f"d{i}#0", doc_id=f"d{i}", text=text, token_ids=ids, span=(0, 0),
                         content_hash=token_hash(ids)))
    return out


def _plan(rag, mode: str, order: slice):
    segments = rag.prompt.segments(QUESTION, _chunks(rag)[order])
    return rag.reuse.plan(segments, dataclasses.replace(rag.settings, mode=mode))


def _all_at_once(rag, plan, layout, extra: int):
    """The cache as assembly filled it before uploads went layer by layer: every layer of an entry at once."""
    model = rag.model
    cache = model.new_cache(1, layout.size + extra)
    for index, entry in plan.entries.items():
        s, e = layout.spans[index]
        cache.keys[:, 0, :, s:e] = rerotate(entry.keys, int(layout.positions[s]) - entry.start, model.inv_freq)
        cache.values[:, 0, :, s:e] = entry.values
    return cache


class DeferredUploads:
    """Runs layer i's copies only when layer i is waited for, and records the waits."""

    def __init__(self, calls: list):
        self.calls, self.pending = calls, {}

    def issue(self, layer, copy):
        self.pending[layer] = copy

    def wait(self, layer):
        self.calls.append(("wait", layer))
        for ready in sorted(i for i in self.pending if i <= layer):
            self.pending.pop(ready)()


@pytest.mark.parametrize("order", [slice(None), slice(None, None, -1)], ids=["same", "reversed"])
@pytest.mark.parametrize("mode", list(MODES))
def test_layer_by_layer_cache_and_answer_equal_the_all_at_once_ones(rag, mode, order):
    plan = _plan(rag, mode, order)
    head_only = mode == "full" or (mode == "prefix" and order.step == -1)  # no exact prefix behind the head
    assert head_only or len(plan.entries) > 1  # chunks are reused, not only the head
    extra = rag.max_new_tokens + 1
    layout, cache = rag.reuse.assemble(plan, extra)
    reference = _all_at_once(rag, plan, layout, extra)
    assert torch.equal(cache.keys, reference.keys) and torch.equal(cache.values, reference.values)
    assert layout.uploaded == {}  # on a CPU every entry already sits on the model's device

    reference.positions, reference.length, reference.context = cache.positions.clone(), cache.length, cache.context
    answers = []
    for kv in (cache, reference):
        prefilled = rag.reuse.recompute(plan, layout, kv)
        answers.append((prefilled.logits, decode(rag.model, kv, prefilled.logits[None],
                                                 torch.tensor([int(layout.positions[-1]) + 1]), 4)))
    assert torch.equal(answers[0][0], answers[1][0]) and answers[0][1] == answers[1][1]


@pytest.mark.parametrize("mode", list(MODES))
def test_each_layer_waits_for_its_rows_after_the_layer_before_and_reads_none_earlier(rag, mode, monkeypatch):
    """Layer i's copies run only at its wait, and every reused row holds NaN until then: a layer that read
    rows before their wait, or a wait after a layer's attention, would change the logits or make them NaN."""
    plan = _plan(rag, mode, slice(None, None, -1))
    extra = rag.max_new_tokens + 1
    layout, cache = rag.reuse.assemble(plan, extra)
    expected = rag.reuse.recompute(plan, layout, cache).logits

    calls: list = []
    layout, cache = assemble(rag.model, plan.segments, plan.entries, plan.exact, extra,
                             parallel=plan.mode.parallel, uploads=DeferredUploads(calls))
    reused = layout.reused.nonzero()[:, 0]
    cache.keys[:, 0, :, reused] = float("nan")
    cache.values[:, 0, :, reused] = float("nan")
    finish = rag.model.finish
    monkeypatch.setattr(rag.model, "finish", lambda i, *a, **k: calls.append(("attend", i)) or finish(i, *a, **k))
    got = rag.reuse.recompute(plan, layout, cache).logits
    assert torch.equal(got, expected)
    assert cache.uploads is None and torch.isfinite(cache.keys[:, 0, :, : layout.size]).all()

    first = {call: calls.index(call) for call in reversed(calls)}
    for i in range(rag.model.args.n_layers):
        assert first[("wait", i)] < first[("attend", i)]
        if i:
            assert first[("attend", i - 1)] < first[("wait", i)]  # not all waits up front: layers overlap copies


def test_entries_away_from_the_model_device_are_staged_there_layer_by_layer(rag):
    """The host-entry branch, run on the CPU by giving the model another device index: each such entry gets
    a full copy on the model's device (for the store's device tier) and the cache is what it is without it."""
    from types import SimpleNamespace

    from chunk_cache.upload import fill

    plan = _plan(rag, "naive", slice(None, None, -1))
    layout, cache = rag.reuse.assemble(plan, 0)
    shift = torch.zeros(layout.size, dtype=torch.long)
    for index, entry in plan.entries.items():
        s, e = layout.spans[index]
        shift[s:e] = int(layout.positions[s]) - entry.start
    elsewhere = SimpleNamespace(device=torch.device("cpu", 0), args=rag.model.args, layer_rope=rag.model.layer_rope)
    staged = rag.model.new_cache(1, layout.size)
    copies = fill(elsewhere, staged, {i: layout.spans[i] for i in plan.entries}, plan.entries, shift)
    assert sorted(copies) == sorted(plan.entries)
    for index, copy in copies.items():
        assert copy.keys is not plan.entries[index].keys and torch.equal(copy.keys, plan.entries[index].keys)
        assert torch.equal(copy.values, plan.entries[index].values) and copy.start == plan.entries[index].start
    assert torch.equal(staged.keys, cache.keys) and torch.equal(staged.values, cache.values)


def test_on_cuda_layer_copies_run_on_the_side_stream_and_each_layer_waits_for_its_event(monkeypatch):
    """LayerUploads' CUDA branch against a recording stand-in for torch.cuda's streams: every layer's copies
    run on the side stream after it caught up with the computing stream, and wait(i) waits for layer i's event."""
    from contextlib import contextmanager

    from chunk_cache import upload

    log, current = [], ["compute"]

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append((self.name, "waits for", other.name))

        def record_event(self):
            event = f"event {sum(entry[1] == 'records' for entry in log)}"
            log.append((self.name, "records", event))
            return event

        def wait_event(self, event):
            log.append((self.name, "waits for event", event))

    @contextmanager
    def on(stream):
        current.append(stream.name)
        yield
        current.pop()

    monkeypatch.setattr(upload, "_side_stream", lambda device: Stream("side"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(current[-1]))
    monkeypatch.setattr(torch.cuda, "stream", on)
    uploads = upload.LayerUploads(torch.device("cuda", 0), overlap=True)
    for layer in range(3):
        uploads.issue(layer, lambda layer=layer: log.append(("copy", layer, current[-1])))
    assert log == [entry for layer in range(3) for entry in [
        ("side", "waits for", "compute"), ("copy", layer, "side"), ("side", "records", f"event {layer}")]]
    uploads.wait(1)
    assert log[-1] == ("compute", "waits for event", "event 1")
