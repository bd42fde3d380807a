"""Rotary position embeddings (Su et al. 2021) in Hugging Face's rotate-half layout: the first and
second halves of a head's features form the rotated pairs, so q and k weights of Llama checkpoints
load unpermuted. With Llama 3's frequency scaling (`rope_scaling`), as Meta's reference and
transformers compute it."""

from __future__ import annotations

import math

import torch

Rotary = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), float32


def inverse_frequencies(head_dim: int, theta: float, scaling: tuple[float, ...] = ()) -> torch.Tensor:
    """theta^(-2i/head_dim) for i < head_dim/2; with Llama 3 scaling (factor, low and high frequency
    factors, the original context) the long wavelengths are divided by the factor, the short ones
    kept, and those between interpolated smoothly."""
    # On the CPU whatever the default device (a model built on the meta device still needs them).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
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


def angle_table(inv_freq: torch.Tensor, length: int, device: torch.device) -> Rotary:
    """cos and sin of positions 0 .. length-1 [length, head_dim], float32: computed once, then read
    by position (a forward or a decoding step only indexes it)."""
    with torch.autocast(device.type, enabled=False):
        angles = torch.arange(length, device=device).float()[:, None] * inv_freq.to(device)
        both = torch.cat((angles, angles), dim=-1)
        return both.cos(), both.sin()


def rotary_at(table: Rotary, positions: torch.Tensor | int) -> Rotary:
    """The table's rows for `positions` as [rows, 1 (heads), time, head_dim]: an int T means 0 .. T-1
    for every row (training), a tensor [rows, time] each row's own (decoding)."""
    if isinstance(positions, int):
        return table[0][None, None, :positions], table[1][None, None, :positions]
    return table[0][positions][:, None], table[1][positions][:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate the features of x [batch, heads, time, head_dim] by their positions' angles."""
    cos, sin = rotary
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)
