"""Fine-tuning samples as training rows: packed several to a row without cross-contamination, or
one per row, padded.

A sample of n tokens gives n - 1 positions (inputs and next-token targets; its first token is never
a target). With `data.packing = true` the samples are packed into rows of `block_size` positions by
best-fit decreasing: the longest sample first, each into the fullest row it still fits, a new row
when none has room. The packing is a function of the samples' lengths and block_size alone, so it
is the same for every layout, rank count and resume; every epoch visits the rows in a new order
(hpcllm.data.loader). Within a row each sample attends only to itself and its positions restart at 0
(hpcllm.batch), so a sample's loss and gradients are those it would have alone. Padding fills the
rest of a row: its targets are not trained and it attends only to itself.

A sample longer than block_size + 1 tokens is cut to its first block_size + 1 (prepare's
`--max-tokens` sets the limit at which samples are truncated or dropped before this).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from hpcllm.batch import IGNORE, Batch
from hpcllm.data.tokens import Prepared
from hpcllm.errors import UsageError


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices, each holding at most `capacity`, by best-fit decreasing; ties broken
    by index, so the result depends on the sizes alone. Items are listed in index order per bin."""
    order = np.argsort(-np.asarray(sizes, dtype=np.int64), kind="stable")
    bins: list[list[int]] = []
    free: list[int] = []  # sorted room left of the bins that have any
    holders: dict[int, list[int]] = {}  # room -> bins with that room, the oldest first
    for item in order:
        size = int(sizes[item])
        at = bisect.bisect_left(free, size)
        if at == len(free):
            target = len(bins)
            bins.append([])
            room = capacity
        else:
            room = free.pop(at)
            target = holders[room].pop(0)
            if holders[room]:
                bisect.insort(free, room)  # other bins still have this much room
        bins[target].append(int(item))
        left = room - size
        if left > 0:
            if not holders.get(left):
                bisect.insort(free, left)
            holders.setdefault(left, []).append(target)
    return [sorted(members) for members in bins]


@dataclass
class PackedSamples:
    """A fine-tuning split's samples in rows (one per row without packing)."""

    tokens: np.ndarray
    mask: np.ndarray  # 1 where a token is a trained target
    starts: np.ndarray  # [samples + 1] token offsets of the samples
    block_size: int
    pad_id: int
    packing: bool

    def __post_init__(self) -> None:
        lengths = np.diff(self.starts)
        self.positions_used = np.minimum(lengths, self.block_size + 1) - 1
        self.truncated = int(np.count_nonzero(lengths > self.block_size + 1))
        if self.packing:
            self.bins = best_fit_decreasing(self.positions_used, self.block_size)
        else:
            self.bins = [[i] for i in range(len(lengths))]

    @classmethod
    def of_split(cls, data: Prepared, split: str, block_size: int, packing: bool) -> PackedSamples:
        lengths = np.asarray(data.side(split, "lengths"), dtype=np.int64)
        if lengths.size == 0:
            raise UsageError(f"{data.path}: the {split} split holds no samples")
        starts = np.concatenate([[0], np.cumsum(lengths)])
        return cls(data.tokens(split), data.side(split, "mask"), starts, block_size, data.eot_id, packing)

    @property
    def n_sequences(self) -> int:
        return len(self.bins)

    def rows(self, indices: np.ndarray) -> Batch:
        shape = (len(indices), self.block_size)
        inputs = np.full(shape, self.pad_id, dtype=np.int64)
        targets = np.full(shape, IGNORE, dtype=np.int64)
        positions = np.zeros(shape, dtype=np.int64)
        documents = np.zeros(shape, dtype=np.int64)
        for row, index in enumerate(indices):
            at = 0
            for document, sample in enumerate(self.bins[int(index)]):
                used = int(self.positions_used[sample])
                first = int(self.starts[sample])
                ids = np.asarray(self.tokens[first : first + used + 1], dtype=np.int64)
                trained = np.asarray(self.mask[first + 1 : first + used + 1], dtype=bool)
                inputs[row, at : at + used] = ids[:-1]
                targets[row, at : at + used] = np.where(trained, ids[1:], IGNORE)
                positions[row, at : at + used] = np.arange(used)
                documents[row, at : at + used] = document
                at += used
            documents[row, at:] = len(self.bins[int(index)])  # the padding: a document of its own
            positions[row, at:] = np.arange(self.block_size - at)
        return Batch(inputs, targets, positions, documents)
