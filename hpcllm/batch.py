"""A micro-batch as the model and the loss see it.

`tokens` [batch, time] are the inputs and `targets` the next tokens; a target equal to `IGNORE`
is not trained on (a prompt's tokens in fine-tuning, padding): the loss mask is the ignore index,
as in torch's cross-entropy. `positions` and `documents` describe packed sequences (position ids
restarting at every document, a document index per token): a token attends only to the earlier
tokens of its own document (`attention_mask`). None means one document per row, positions 0..time-1.

The loss of a step is the sum of the per-token losses over every trained target of the global
batch, divided by the number of trained targets in it (all micro-batches, all data-parallel
ranks): with no target ignored that is the plain mean, and with a mask it does not depend on the
micro-batch size, gradient accumulation or dp.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

IGNORE = -100  # a target the loss skips (torch's cross_entropy default ignore_index)


@dataclass(frozen=True)
class Batch:
    tokens: Any  # [batch, time] int64, numpy on the host or a torch tensor on the device
    targets: Any  # [batch, time] int64; IGNORE where no loss is taken
    positions: Any = None  # [batch, time] position ids, None = 0..time-1 in every row
    documents: Any = None  # [batch, time] document index per token, None = one document per row
    dropout: Any = None  # the rows' model.dropout.DropoutKeys, when the model drops out in training
    attention: Any = None  # [batch, 1, time, time] bool, from `documents` on the device (to_device)

    def trained_tokens(self) -> int:
        """How many targets the loss counts (read on the host, before the batch moves)."""
        return int(np.count_nonzero(np.asarray(self.targets) != IGNORE))

    def to_device(self, device: Any) -> Batch:
        """torch tensors on `device`; to a GPU from pinned memory, without stalling the host."""
        import torch

        def move(array: Any) -> Any:
            if array is None:
                return None
            tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
            if device.type == "cuda":
                return tensor.pin_memory().to(device, non_blocking=True)
            return tensor.to(device)

        documents = move(self.documents)
        return replace(
            self,  # dropout keys are made on the device
            tokens=move(self.tokens),
            targets=move(self.targets),
            positions=move(self.positions),
            documents=documents,
            attention=None if documents is None else attention_mask(documents),
        )


def attention_mask(documents: Any) -> Any:
    """[batch, 1, time, time] bool, True where query i may attend key j: j <= i in the same
    document (scaled_dot_product_attention's boolean mask; the 1 broadcasts over heads)."""
    import torch

    time = documents.shape[1]
    causal = torch.ones(time, time, dtype=torch.bool, device=documents.device).tril()
    same = documents[:, :, None] == documents[:, None, :]
    return (same & causal)[:, None]
