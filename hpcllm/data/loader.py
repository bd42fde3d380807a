"""Deterministic batches: the global batch of step s is a function of (seed, step) alone.

The token stream is cut into non-overlapping sequences of `block_size + 1` tokens (inputs and
next-token targets). Each epoch visits every sequence once, in an order drawn from (seed, epoch).
Step s takes positions [s*G, (s+1)*G) of that endless sequence of epochs, so

- the global batch does not depend on the data-parallel size;
- DP rank r reads only rows [r*G/dp, (r+1)*G/dp) of it, split into micro-batches;
- within an epoch no sequence repeats and none is skipped, across all ranks together;
- the sampler's whole state is the step number: resuming at step k is exact.

Tokens are read from a memory map, a few rows at a time; the file is never loaded whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hpcllm.errors import UsageError


@dataclass(frozen=True)
class BatchSampler:
    n_tokens: int
    block_size: int
    global_batch: int
    seed: int

    def __post_init__(self) -> None:
        if self.n_sequences < 1:
            raise UsageError(
                f"the data has {self.n_tokens} tokens, fewer than one sequence of block_size + 1 = "
                f"{self.block_size + 1}; use more text or a smaller model.block_size"
            )

    @property
    def n_sequences(self) -> int:
        return max(0, (self.n_tokens - 1) // self.block_size)

    @property
    def steps_per_epoch(self) -> float:
        return self.n_sequences / self.global_batch

    def _order(self, epoch: int) -> np.ndarray:
        return _epoch_order(self.seed, epoch, self.n_sequences)

    def global_indices(self, step: int) -> np.ndarray:
        """Sequence indices of the whole global batch at `step` (length global_batch)."""
        positions = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.n_sequences)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._order(int(epoch))[offsets[mask]]
        return out

    def rank_indices(self, step: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """This DP rank's contiguous slice of the global batch at `step`."""
        if self.global_batch % dp_size:
            raise UsageError(f"global_batch {self.global_batch} is not divisible by dp = {dp_size}")
        per_rank = self.global_batch // dp_size
        return self.global_indices(step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_sequences: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_sequences)


def read_sequences(tokens: np.ndarray, indices: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (int64, shape [len(indices), block_size]) for the given sequences."""
    rows = np.stack([tokens[i * block_size : i * block_size + block_size + 1] for i in indices]).astype(
        np.int64
    )
    return rows[:, :-1], rows[:, 1:]


def micro_batches(
    tokens: np.ndarray, indices: np.ndarray, block_size: int, micro_batch: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split this rank's sequences into micro-batches of `micro_batch` rows, in order."""
    if len(indices) % micro_batch:
        raise UsageError(
            f"{len(indices)} sequences per rank are not divisible by micro_batch = {micro_batch}"
        )
    return [
        read_sequences(tokens, indices[i : i + micro_batch], block_size)
        for i in range(0, len(indices), micro_batch)
    ]
