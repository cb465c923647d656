"""Move cached RoPE keys to new positions.

A key stored post-RoPE at position p is R(p)k; R is a block rotation, so R(p + Δ)k = R(Δ)·R(p)k.
Re-positioning is therefore one more rotation by Δ, computed in fp32 from the model's raw
`inv_freq` (never from cos/sin tables that already carry an attention scaling such as YaRN's).
Layout is rotate-half (coordinate i pairs with i + D/2), as in Llama, Mistral and Qwen2.
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
    """keys [..., T, D] moved by a precomputed `rotation` (cos, sin [T or 1, D]), in fp32, back in keys' dtype."""
    k32 = keys.float()
    return (k32 * cos + rotate_half(k32) * sin).to(keys.dtype)


def rerotate(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """keys [..., T, D] post-RoPE; delta: one shift or one per token [T]. Returns keys at p + delta."""
    delta = torch.as_tensor(delta, dtype=torch.float64, device=keys.device)
    if delta.ndim == 0 and float(delta) == 0.0:
        return keys
    return rotate(keys, *rotation(delta, inv_freq))
