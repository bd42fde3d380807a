"""Rotary position embeddings (Su et al. 2021) in Hugging Face's rotate-half layout: the first and
second halves of a head's features form the rotated pairs, so q and k weights of Llama checkpoints
load unpermuted. With Llama 3's frequency scaling (`rope_scaling`), as Meta's reference and
transformers compute it."""

from __future__ import annotations

import math

import torch

Rotary = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), [batch or 1, time, head_dim], float32


def inverse_frequencies(head_dim: int, theta: float, scaling: tuple[float, ...] = ()) -> torch.Tensor:
    """theta^(-2i/head_dim) for i < head_dim/2; with Llama 3 scaling (factor, low and high frequency
    factors, the original context) the long wavelengths are divided by the factor, the short ones
    kept, and those between interpolated smoothly."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    factor, low_freq_factor, high_freq_factor, original = scaling
    low_freq_wavelen, high_freq_wavelen = original / low_freq_factor, original / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> Rotary:
    """cos and sin of every position's angles [rows, time, head_dim], in float32 whatever autocast
    says; `positions` is [time] or [rows, time] (decoding: each row its own)."""
    if positions.dim() == 1:
        positions = positions[None]
    with torch.autocast(positions.device.type, enabled=False):
        angles = positions[..., None].float() * inv_freq.to(positions.device)
        both = torch.cat((angles, angles), dim=-1)
        return both.cos(), both.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate the features of x [batch, heads, time, head_dim] by their positions' angles."""
    cos, sin = (table.to(x.dtype)[:, None] for table in rotary)
    return x * cos + _rotate_half(x) * sin
