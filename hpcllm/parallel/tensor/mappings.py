"""Megatron's four mappings: the autograd functions through which tensor-parallel layers communicate.

    copy_to_region       forward identity                  backward allreduce(sum)
    reduce_from_region   forward allreduce(sum)            backward identity
    scatter_to_region    forward keep my last-dim slice    backward allgather(last dim)
    gather_from_region   forward allgather(last dim)       backward keep my slice

and for sequence parallelism (Korthikanti et al. 2022), along the sequence dimension (1):

    scatter_to_sequence         forward keep my part of the sequence    backward allgather
    reduce_scatter_to_sequence  forward reduce-scatter                  backward allgather

(the gather into a column-parallel layer is fused with it: layers._SequenceGatheredLinear).

What is communicated lives here; the layers that compute (layers.py) only call these.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcllm.parallel.tensor.collectives import TensorCollectives


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.group.allreduce_(grad.contiguous().clone()), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
        if not x.is_contiguous():
            return group.allreduce_(x.contiguous())
        # In place on the layer's output (the matmul's backward never reads it): no copy.
        ctx.mark_dirty(x)
        return group.allreduce_(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: TensorCollectives, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return group.my_slice(x, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.group.allgather(grad, ctx.dim), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
        ctx.group = group
        return group.allgather(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.group.my_slice(grad), None


SEQUENCE = 1  # activations are (batch, sequence, features)


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
        ctx.group = group
        return group.reduce_scatter(x, SEQUENCE)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.group.allgather(grad.contiguous(), SEQUENCE), None


def scatter_to_sequence(x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
    return _ScatterToRegion.apply(x, group, SEQUENCE)


def reduce_scatter_to_sequence(x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
    return _ReduceScatterToSequence.apply(x, group)


def copy_to_region(x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
    return _ScatterToRegion.apply(x, group, -1)


def gather_from_region(x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
    return _GatherFromRegion.apply(x, group)
