"""Deterministic batches: sample k of a run is a function of (seed, k) alone.

A dataset is a number of sequences (hpcllm.data.sequences reads them: windows of `block_size + 1`
tokens of a token stream, or packed fine-tuning samples). Each epoch visits every sequence once,
in an order drawn from (seed, epoch).
The run reads positions 0, 1, 2, ... of that endless sequence of epochs: a step of global batch G
that starts at sample k takes positions [k, k + G), so

- the global batch does not depend on the data-parallel size;
- DP rank r reads only rows [r*G/dp, (r+1)*G/dp) of it, split into micro-batches;
- within an epoch no sequence repeats and none is skipped, across all ranks together;
- the sampler's whole state is the number of samples consumed: a resume continues exactly, even
  with another global batch (a batch-size ramp-up).

The epoch order is a keyed pseudorandom permutation (a Feistel network with cycle walking),
evaluated only at the positions asked for: memory is O(1) whatever the dataset size, with no
permutation array per rank per epoch. Tokens are read from a memory map, a few rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpcllm.batch import Batch
from hpcllm.errors import UsageError

ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast 64-bit hash whose output bits all depend on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    """A bijection of [0, 4**half): balanced Feistel rounds over two `half`-bit halves."""
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    left, right = x >> shift, x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << shift) | right


def permute(positions: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """The keyed permutation of [0, n) at `positions`: the Feistel bijection of the smallest
    even-bit domain holding n, repeated on any value that falls outside [0, n) (cycle walking keeps
    it a bijection of [0, n); the domain is under 4n, so a few repeats at most)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    out = _feistel(positions.astype(np.uint64), half, keys)
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = _feistel(out[outside], half, keys)
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


def sequences_in(n_tokens: int, block_size: int) -> int:
    """Non-overlapping sequences of block_size + 1 tokens (inputs and targets) in a token stream;
    fewer than one is bad input."""
    n = max(0, (n_tokens - 1) // block_size)
    if n < 1:
        raise UsageError(
            f"the data has {n_tokens} tokens, fewer than one sequence of block_size + 1 = "
            f"{block_size + 1}; use more text or a smaller model.block_size"
        )
    return n


@dataclass(frozen=True)
class BatchSampler:
    n_sequences: int
    seed: int

    def _keys(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).integers(0, 2**63, size=ROUNDS, dtype=np.uint64)

    def global_indices(self, first: int, count: int) -> np.ndarray:
        """Sequence indices of samples [first, first + count) of the run."""
        positions = np.arange(first, first + count, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.n_sequences)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = permute(offsets[mask], self.n_sequences, self._keys(int(epoch)))
        return out

    def rank_indices(self, first: int, global_batch: int, dp_rank: int, dp_size: int) -> np.ndarray:
        return rank_slice(self.global_indices, first, global_batch, dp_rank, dp_size)


def rank_slice(
    global_indices: Callable[[int, int], np.ndarray],
    first: int,
    global_batch: int,
    dp_rank: int,
    dp_size: int,
) -> np.ndarray:
    """This DP rank's contiguous slice of the global batch that starts at sample `first`, from a
    sampler's `global_indices(first, count)` (of one dataset or of a mixture)."""
    if global_batch % dp_size:
        raise UsageError(f"global_batch {global_batch} is not divisible by dp = {dp_size}")
    per_rank = global_batch // dp_size
    return global_indices(first + dp_rank * per_rank, per_rank)


def micro_batches(reader: Any, indices: np.ndarray, micro_batch: int) -> list[Batch]:
    """Split this rank's sequences into micro-batches of `micro_batch` rows, in order, read by
    `reader.rows(indices)` (hpcllm.data.sequences)."""
    if len(indices) % micro_batch:
        raise UsageError(
            f"{len(indices)} sequences per rank are not divisible by micro_batch = {micro_batch}"
        )
    return [reader.rows(indices[i : i + micro_batch]) for i in range(0, len(indices), micro_batch)]
