"""Reading a dataset's sequences as micro-batch rows (hpcllm.batch.Batch), by sequence index.

Two kinds of dataset, one interface (`n_sequences`, `rows(indices)`):

- `TokenWindows`: pretraining token streams, cut into non-overlapping windows of `block_size + 1`
  tokens (inputs and next-token targets). With `data.document_mask` every document of a window
  (a document ends with the end-of-document token) attends only to itself and its positions
  restart at 0, as Llama 3 was trained; the end-of-document token's target (the next document's
  first token) is not trained on, since nothing of the next document is visible from there.
- `PackedSamples` (hpcllm.data.packing): fine-tuning samples with loss masks, packed into rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcllm.batch import IGNORE, Batch
from hpcllm.data.loader import sequences_in


def read_windows(tokens: np.ndarray, indices: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (int64, shape [len(indices), block_size]) of the given windows."""
    rows = np.stack([tokens[i * block_size : i * block_size + block_size + 1] for i in indices]).astype(
        np.int64
    )
    return rows[:, :-1], rows[:, 1:]


def restart_positions(starts: np.ndarray) -> np.ndarray:
    """Position ids that restart at 0 wherever `starts` [rows, time] is True (and at column 0)."""
    time = starts.shape[1]
    columns = np.broadcast_to(np.arange(time), starts.shape)
    first = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
    return (columns - first).astype(np.int64)


@dataclass(frozen=True)
class TokenWindows:
    tokens: np.ndarray  # the split's token stream (a memory map)
    block_size: int
    eos: int | None = None  # with data.document_mask: the end-of-document id, else None

    @property
    def n_sequences(self) -> int:
        return sequences_in(len(self.tokens), self.block_size)

    def rows(self, indices: np.ndarray) -> Batch:
        inputs, targets = read_windows(self.tokens, indices, self.block_size)
        if self.eos is None:
            return Batch(inputs, targets)
        ends = inputs == self.eos
        starts = np.zeros_like(ends)
        starts[:, 1:] = ends[:, :-1]  # a document starts after an end-of-document token
        documents = np.cumsum(starts, axis=1)
        targets = np.where(ends, IGNORE, targets)
        return Batch(inputs, targets, restart_positions(starts), documents)
