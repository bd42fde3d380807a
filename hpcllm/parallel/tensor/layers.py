"""Megatron-style tensor-parallel layers. Each holds this TP rank's slice of its parameters and
declares how they are split (`parameter_sharding`), which is what clipping and checkpoints read.

    ColumnParallelLinear     output features split (rows of the weight); `blocks` for a fused q,k,v
    RowParallelLinear        input features split (weight columns); the bias is added once, after the reduce

A Linear without a bias (Llama's) stays without one.
    VocabParallelEmbedding   vocabulary rows split, padded to a multiple of tp
    VocabParallelHead        logits for this rank's vocabulary slice and the vocabulary-parallel loss

Communication goes through the mappings; these layers only compute, except the sequence-parallel
column layer, which gathers its input again in backward (memory is the point of it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpcllm.batch import IGNORE
from hpcllm.parallel.sharding import Sharding, padded_size, shard
from hpcllm.parallel.tensor.collectives import TensorCollectives
from hpcllm.parallel.tensor.cross_entropy import vocab_parallel_cross_entropy
from hpcllm.parallel.tensor.mappings import (
    SEQUENCE,
    copy_to_region,
    reduce_from_region,
    reduce_scatter_to_sequence,
)


class _SequenceGatheredLinear(torch.autograd.Function):
    """y = allgather_sequence(x) @ W^T + b, keeping only x, this rank's part of the sequence, for
    backward and gathering it again there (Megatron-SP): the whole sequence is never held between
    forward and backward. Backward reduce-scatters the input gradient, which is partial on every
    rank (each holds a slice of W)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: TensorCollectives
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return F.linear(group.allgather(x, SEQUENCE), weight, bias)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        # Under autocast the forward's matmul ran in the gradient's dtype (bf16); backward does too,
        # and hands back gradients in the dtypes of x and the weight.
        compute = grad.dtype
        whole = ctx.group.allgather(x, SEQUENCE).to(compute)
        grad_input = ctx.group.reduce_scatter(grad @ weight.to(compute), SEQUENCE).to(x.dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = (rows.t() @ whole.reshape(-1, whole.shape[-1])).to(weight.dtype)
        bias = rows.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_input, grad_weight, bias, None


def _optional(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor)


class ColumnParallelLinear(nn.Module):
    """Output features split: input replicated in, this rank's slice of the output out. `blocks`
    stacked in the output (q, k, v: a count of equal ones or their sizes) are each split alike, so
    every rank gets whole heads."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group: TensorCollectives,
        blocks: int | tuple[int, ...] = 1,
    ):
        super().__init__()
        self.group = group
        self.blocks = blocks
        self.weight = nn.Parameter(weight)
        self.bias = _optional(bias)
        self.sequence_parallel = False  # the input is this rank's part of the sequence: gather it

    @classmethod
    def from_full(
        cls, full: nn.Linear, group: TensorCollectives, blocks: int | tuple[int, ...] = 1
    ) -> ColumnParallelLinear:
        split = Sharding(dim=0, blocks=blocks)
        weight = shard(full.weight, split, group.rank, group.size)
        bias = None if full.bias is None else shard(full.bias, split, group.rank, group.size)
        return cls(weight, bias, group, blocks)

    def parameter_sharding(self) -> dict[str, Sharding]:
        split = Sharding(dim=0, blocks=self.blocks)
        return {"weight": split} | ({"bias": split} if self.bias is not None else {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return _SequenceGatheredLinear.apply(x, self.weight, self.bias, self.group)
        return F.linear(copy_to_region(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split: partial products are summed over the group, then the bias is added."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: TensorCollectives):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight)
        self.bias = _optional(bias)  # replicated: added once, after the sum
        self.sequence_parallel = False  # leave only this rank's part of the sequence of the sum

    @classmethod
    def from_full(cls, full: nn.Linear, group: TensorCollectives) -> RowParallelLinear:
        weight = shard(full.weight, Sharding(dim=1), group.rank, group.size)
        return cls(weight, None if full.bias is None else full.bias.detach().clone(), group)

    def parameter_sharding(self) -> dict[str, Sharding]:
        # With sequence parallelism the bias is added to this rank's part of the sequence only.
        bias = {"bias": Sharding(sequence_parallel=self.sequence_parallel)} if self.bias is not None else {}
        return {"weight": Sharding(dim=1)} | bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leave = reduce_scatter_to_sequence if self.sequence_parallel else reduce_from_region
        summed = leave(F.linear(x, self.weight), self.group)
        return summed if self.bias is None else summed + self.bias


def _vocabulary_rows(full: torch.Tensor, group: TensorCollectives) -> tuple[torch.Tensor, int]:
    """This rank's rows of a [vocab, n_embd] weight (the vocabulary padded to a multiple of the
    group) and the id of its first row."""
    vocab_size = full.shape[0]
    weight = shard(full, Sharding(dim=0, full_size=vocab_size), group.rank, group.size)
    return weight, vocab_start(vocab_size, group)


def vocab_start(vocab_size: int, group: TensorCollectives) -> int:
    """The first vocabulary id of this rank's slice."""
    return group.rank * padded_size(vocab_size, group.size) // group.size


class VocabParallelEmbedding(nn.Module):
    """Each rank owns rows [start, start + rows) of the (padded) vocabulary; other ids give zeros
    here and their embedding arrives through the sum over the group."""

    def __init__(self, weight: torch.Tensor, start: int, vocab_size: int, group: TensorCollectives):
        super().__init__()
        self.group = group
        self.start = start
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(weight)

    @classmethod
    def from_full(cls, full: nn.Embedding, group: TensorCollectives) -> VocabParallelEmbedding:
        weight, start = _vocabulary_rows(full.weight, group)
        return cls(weight, start, full.weight.shape[0], group)

    def parameter_sharding(self) -> dict[str, Sharding]:
        return {"weight": Sharding(dim=0, full_size=self.vocab_size)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.start + self.weight.shape[0])
        local = (ids - self.start).masked_fill(outside, 0)
        embedded = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(embedded, self.group)


class VocabParallelHead(nn.Module):
    """Logits for this rank's vocabulary slice, through the tied (partitioned) embedding or, untied,
    through its own slice of the head's rows (`weight`), and the vocabulary-parallel loss over them."""

    def __init__(
        self, group: TensorCollectives, start: int, vocab_size: int, weight: torch.Tensor | None = None
    ):
        super().__init__()
        self.group = group
        self.start = start
        self.vocab_size = vocab_size
        self.weight = _optional(weight)
        self.sequence_parallel = False  # the hidden state is this rank's part of the sequence

    @classmethod
    def from_full(cls, full: nn.Linear, group: TensorCollectives) -> VocabParallelHead:
        """An untied head [vocab, n_embd], cut by vocabulary rows as the embedding is."""
        weight, start = _vocabulary_rows(full.weight, group)
        return cls(group, start, full.weight.shape[0], weight)

    def parameter_sharding(self) -> dict[str, Sharding]:
        return {} if self.weight is None else {"weight": Sharding(dim=0, full_size=self.vocab_size)}

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = embedding_weight if self.weight is None else self.weight
        if self.sequence_parallel:
            return _SequenceGatheredLinear.apply(hidden, weight, None, self.group)
        return F.linear(copy_to_region(hidden, self.group), weight)

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The sum over the trained targets (not IGNORE), as the plain head's."""
        flat, wanted = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        trained = wanted != IGNORE
        per_token = vocab_parallel_cross_entropy(
            flat, wanted.masked_fill(~trained, 0), self.group, self.start, self.vocab_size
        )
        return (per_token * trained).sum()
