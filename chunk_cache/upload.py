"""Reused chunk KV into a prompt's cache, layer by layer, overlapped with the layers' computation.

Layer i needs its reused rows when layer i runs, not before layer 0. An entry held in host memory
(the store's host tier, page-locked when the store serves an accelerator) is therefore copied in
layer order on a side CUDA stream that records one event per layer, and the computing stream
waits for layer i's event right before layer i first reads or writes cache.keys[i] /
cache.values[i] (`KVCache.ready`): layer i computes while layers i+1.. are still in transfer.
Per layer: each host entry's layer -> its device copy (which the store's device tier keeps,
`KVStore.promote`), each entry's layer -> its rows of the cache, then one rotation of every moved
row to its new position with that layer's own RoPE (chunk_cache.rope).

On a CPU, or when every entry already sits on the device, there is nothing to overlap: the same
copies run at once on the current stream and the waits do nothing.

Every tensor the side stream touches stays referenced until the computing stream has waited for
its last event (the cache, the device copies, the plan's entries), so the CUDA caching allocator
never hands their memory to other work too early.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from chunk_cache.rope import rotate, rotation
from chunk_cache.store import ChunkKV


class LayerUploads:
    """The copies into one cache, issued layer by layer (`issue`, in layer order); `wait(i)` makes the
    current stream wait until layers 0..i are in place."""

    def __init__(self, device: torch.device, overlap: bool):
        self.device = device
        self.stream = _side_stream(device) if overlap else None
        self.events: dict[int, torch.cuda.Event] = {}  # layer -> recorded after its copies (side stream only)

    def issue(self, layer: int, copy: Callable[[], None]) -> None:
        """Run layer `layer`'s copies: at once, or on the side stream behind everything queued so far
        (the cache's allocation included)."""
        if self.stream is None:
            copy()
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copy()
        self.events[layer] = self.stream.record_event()

    def wait(self, layer: int) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.events[layer])


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One upload stream per device for the process (streams are pooled; their cached memory is not)."""
    return torch.cuda.Stream(device)


def fill(model, cache, spans: dict[int, tuple[int, int]], entries: dict[int, ChunkKV], shift: torch.Tensor,
         uploads: LayerUploads | None = None) -> dict[int, ChunkKV]:
    """Copy entry `index` into cache rows spans[index] of every layer, keys moved by shift [N] (per cache
    row: new position - stored position); `cache.uploads` is what the layers wait on.

    Entries keep the model's dtype (their key says so). Returns the device copies made of entries that
    were not on the model's device (segment index -> ChunkKV), complete once the last layer was waited for.
    """
    device = model.device
    away = [index for index, kv in entries.items() if kv.keys.device != device]
    copies = {index: _room_for(entries[index], device) for index in away}
    moved = shift.nonzero()[:, 0]
    slots = moved.to(device)
    rotations = {}  # per distinct RoPE setting: cos, sin [M, R], once for all layers that share it
    for i in range(model.args.n_layers):
        inv_freq = model.layer_rope(i)
        if inv_freq is not None and id(inv_freq) not in rotations:
            rotations[id(inv_freq)] = rotation(shift[moved].to(device), inv_freq)
    if uploads is None:
        uploads = LayerUploads(device, overlap=device.type == "cuda" and bool(away))

    def copy_layer(i: int) -> None:
        for index, kv in entries.items():
            s, e = spans[index]
            source = copies.get(index, kv)
            if index in copies:  # from page-locked host memory this is an asynchronous DMA
                source.keys[i].copy_(kv.keys[i], non_blocking=True)
                source.values[i].copy_(kv.values[i], non_blocking=True)
            cache.keys[i, 0, :, s:e] = source.keys[i]
            cache.values[i, 0, :, s:e] = source.values[i]
        inv_freq = model.layer_rope(i)
        if len(moved) and inv_freq is not None:  # a layer without RoPE keeps its keys as they are
            cache.keys[i, 0, :, slots] = rotate(cache.keys[i, 0, :, slots], *rotations[id(inv_freq)])

    for i in range(model.args.n_layers):
        uploads.issue(i, functools.partial(copy_layer, i))
    cache.uploads = uploads
    return copies


def _room_for(kv: ChunkKV, device: torch.device) -> ChunkKV:
    """An entry on `device` whose keys and values the layer copies fill (its small statistics go up now)."""
    return ChunkKV(torch.empty_like(kv.keys, device=device), torch.empty_like(kv.values, device=device), kv.start,
                   {name: t.to(device, non_blocking=True) for name, t in kv.extras.items()}, kv.context)
