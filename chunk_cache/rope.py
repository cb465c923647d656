"""Move cached RoPE keys to new positions.

A key stored post-RoPE at position p is R(p)k; R is a block rotation, so R(p + Δ)k = R(Δ)·R(p)k.
Re-positioning is therefore one more rotation by Δ, computed in fp32 from the model's raw
`inv_freq` (never from cos/sin tables that already carry an attention scaling such as YaRN's).
Layout is rotate-half (coordinate i pairs with i + R/2), as in every family transformers ships.

Families differ per layer: Gemma 3's local and global layers have their own θ and scaling, Phi's partial
rotary turns only the leading R < D dims, SmolLM3 has layers without RoPE. The decoder therefore gives
each layer's own frequencies (`layer_rope(i)`, None: nothing to rotate), and R = 2 * len(inv_freq).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotation(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] fp32 of a move by `delta` [T] positions (one per token, or [1] for all), angles in fp64."""
    angles = delta.to(torch.float64).reshape(-1, 1) * inv_freq.to(device=delta.device, dtype=torch.float64)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """keys [..., T, D] moved by a precomputed `rotation` (cos, sin [T or 1, R]), in fp32, back in keys' dtype;
    only the leading R dims turn (partial rotary)."""
    r = cos.shape[-1]
    k32 = keys[..., :r].float()
    moved = (k32 * cos + rotate_half(k32) * sin).to(keys.dtype)
    return moved if r == keys.shape[-1] else torch.cat([moved, keys[..., r:]], dim=-1)


def rerotate(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor | None) -> torch.Tensor:
    """keys [..., T, D] post-RoPE; delta: one shift or one per token [T]. Returns keys at p + delta
    (the keys themselves on a layer without RoPE, inv_freq None)."""
    delta = torch.as_tensor(delta, dtype=torch.float64, device=keys.device)
    if inv_freq is None or (delta.ndim == 0 and float(delta) == 0.0):
        return keys
    return rotate(keys, *rotation(delta, inv_freq))
