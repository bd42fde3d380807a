"""A language model's output head and its loss: logits over the vocabulary, and the sum of the
next-token cross-entropies over the trained targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcllm.batch import IGNORE
from hpcllm.parallel.tensor.cross_entropy import chunked_linear_cross_entropy
from hpcllm.parallel.tensor.mappings import copy_to_region


class TiedHead(nn.Module):
    """Output logits through the token embedding's weight (passed in, so it is not registered twice),
    and the loss over them. Tensor parallelism swaps in a vocabulary-parallel version."""

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, embedding_weight)

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss_sum(logits, targets)


class UntiedHead(nn.Linear):
    """An output head with its own weight [vocab, n_embd] (Llama's untied embeddings); tensor
    parallelism swaps in a vocabulary-parallel version holding its rows' slice."""

    def __init__(self, n_embd: int, vocab_size: int):
        super().__init__(n_embd, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss_sum(logits, targets)


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the next-token cross-entropies over the targets that are not IGNORE, in fp32."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the trained targets (for one batch on its own)."""
    return lm_loss_sum(logits, targets) / (targets != IGNORE).sum().clamp(min=1)


def chunked_loss_sum(
    head: nn.Module, normed: torch.Tensor, targets: torch.Tensor, tied: torch.Tensor | None, chunk: int
) -> torch.Tensor:
    """The head's loss sum over `normed` [batch, time, width] (the final norm's output), `chunk`
    tokens at a time, each chunk's gradients made with its loss: the logits exist for one chunk at
    a time, never for the whole micro-batch, and nothing is recomputed (Liger-style fused linear
    cross-entropy, parallel.tensor.cross_entropy). The same sum as the whole head's, up to the order
    of the additions; vocabulary-parallel under TP."""
    weight = tied if tied is not None else head.weight
    rows, wanted = normed.reshape(-1, normed.shape[-1]), targets.reshape(-1)
    group = getattr(head, "group", None)  # a vocabulary-parallel head's TP group
    if group is None:
        return chunked_linear_cross_entropy(rows, weight, wanted, chunk)
    rows = copy_to_region(rows, group)  # its backward sums the rows' gradient over TP
    return chunked_linear_cross_entropy(rows, weight, wanted, chunk, group, head.start, head.vocab_size)
