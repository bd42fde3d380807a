"""Dropout that every layout draws alike: the mask is a function of (seed, site, sample, element).

An element's fate is a hash of the run's seed, the dropout site (which layer, which kind), the
global number of the sample its row holds (its place in the run's sample stream) and the element's
coordinates inside the sample (position and feature, or head, query and key), never of a random
generator's state. So:
- the ranks of a TP group that hold an element whole drop it alike (same coordinates);
- elements split over TP (heads, sequence-parallel slices) get their own, independent masks
  (their global coordinates differ);
- dp, the micro-batch size and the pipeline do not change which elements a sample drops;
- recomputation in backward draws the same mask, and a resumed run continues bitwise: there is
  no generator state to save.
The one-process run is the oracle for every layout, with dropout too (tests/test_dropout.py).

The hash is Wellons' `lowbias32` on int64 tensors holding 32-bit values: per element one xor and
one hash of a cached coordinate grid, about ten integer operations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_LOW32 = 0xFFFFFFFF

# A dropout site's number: the embedding's is EMBEDDING, a block's 1 + 3 * layer + one of these.
EMBEDDING = 0
ATTENTION, ATTENTION_OUT, MLP_OUT = 0, 1, 2


def block_site(layer: int, kind: int) -> int:
    return 1 + 3 * layer + kind


@dataclass(frozen=True)
class DropoutKeys:
    """What a forward pass's masks are made from."""

    seed: int
    samples: torch.Tensor  # [batch] int64: each row's sample number in the run's sample stream
    tp_rank: int = 0  # where this rank's heads and sequence slice sit among the TP group's
    sequence_parallel: bool = False  # the residual stream holds this rank's part of the sequence

    def sequence_offset(self, local_length: int) -> int:
        """The position of this rank's first residual-stream position in the sequence."""
        return self.tp_rank * local_length if self.sequence_parallel else 0


def _hash(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on values in [0, 2^32), elementwise; int64 keeps the products' low 32 bits exact."""
    x = x & _LOW32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _LOW32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _LOW32
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=64)
def _hashed_coordinates(
    shape: tuple[int, ...], strides: tuple[int, ...], offset: int, device: str
) -> torch.Tensor:
    """The hash of every element's coordinate inside a sample: sum(index * stride) + offset."""
    coordinate = torch.full((), offset, dtype=torch.int64, device=device)
    for dim, (size, stride) in enumerate(zip(shape, strides, strict=True)):
        view = [1] * len(shape)
        view[dim] = size
        coordinate = coordinate + torch.arange(size, device=device).view(view) * stride
    return _hash(coordinate ^ _hash(coordinate >> 32))  # coordinates past 2^32 fold in their high bits


def keyed_dropout(
    x: torch.Tensor,
    p: float,
    keys: DropoutKeys,
    site: int,
    strides: tuple[int, ...],
    offset: int = 0,
) -> torch.Tensor:
    """x [batch, ...] with each element zeroed with probability p (the rest scaled by 1/(1-p)).
    Element (row, i, j, ...) has in-sample coordinate offset + i*strides[0] + j*strides[1] + ...:
    the caller lays the sample's global coordinates out so that they never collide."""
    grid = _hashed_coordinates(tuple(x.shape[1:]), strides, offset, str(x.device))
    seed = _hash(_hash(torch.tensor(keys.seed, device=x.device)) ^ site)
    row = _hash(seed ^ keys.samples.to(x.device))
    bits = _hash(row.view(-1, *[1] * (x.dim() - 1)) ^ grid)
    keep = (bits >> 8).to(torch.float32) >= p * (1 << 24)  # 24 uniform bits against p
    return x * keep.to(x.dtype) / (1 - p)


def dropout(
    x: torch.Tensor,
    p: float,
    training: bool,
    keys: DropoutKeys | None,
    site: int,
    strides: tuple[int, ...],
    offset: int = 0,
) -> torch.Tensor:
    """Keyed dropout when the batch carries keys; torch's (its generator) when it does not (a model
    used outside a training run); nothing in evaluation or at p = 0."""
    if not training or p == 0:
        return x
    if keys is None:
        return F.dropout(x, p, training=True)
    return keyed_dropout(x, p, keys, site, strides, offset)
