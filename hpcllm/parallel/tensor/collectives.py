"""The collectives tensor parallelism needs inside autograd, over the TP group, with one backend switch.

Megatron's four mappings (what is communicated, kept apart from the layers that compute):

    copy_to_region       forward identity            backward allreduce(sum)
    reduce_from_region   forward allreduce(sum)      backward identity
    scatter_to_region    forward keep my last-dim slice   backward allgather(last dim)
    gather_from_region   forward allgather(last dim)      backward keep my slice

Backend: CPU tensors go through mpi4py on the TP sub-communicator, in place on the tensor's own
memory (numpy views share it: no copies); CUDA tensors through Horovod's allreduce on the TP
process set (NCCL), since mpi4py would need a CUDA-aware MPI. bfloat16 has no MPI type and is
reduced in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hpcllm.cluster import watchdog


class TensorCollectives:
    """Sum/max allreduce and last-dimension allgather over one group of ranks."""

    def __init__(self, comm: Any, cuda_backend: Callable[[], tuple[Any, Any]] | None = None):
        """`cuda_backend` gives (horovod.torch, the group's process set) when a CUDA tensor comes."""
        self.comm = comm
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self._cuda_backend = cuda_backend

    def _horovod(self) -> tuple[Any, Any]:
        if self._cuda_backend is None:
            raise RuntimeError("CUDA tensors need Horovod: build TensorCollectives with cuda_backend")
        return self._cuda_backend()

    def _mpi_inplace(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        from mpi4py import MPI

        work = tensor if tensor.dtype != torch.bfloat16 else tensor.float()
        with watchdog.waiting("tensor-parallel allreduce"):
            self.comm.Allreduce(MPI.IN_PLACE, work.detach().numpy(), op=MPI.SUM if op == "sum" else MPI.MAX)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` (contiguous) in place over the group and return it."""
        if self.size == 1:
            return tensor
        if tensor.is_cuda:
            hvd, process_set = self._horovod()
            reduced = hvd.allreduce(tensor, op=hvd.Sum if op == "sum" else hvd.Max, process_set=process_set)
            return tensor.copy_(reduced)
        return self._mpi_inplace(tensor, op)

    def allgather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` along the last dimension, in rank order."""
        if self.size == 1:
            return tensor
        if tensor.is_cuda:
            hvd, process_set = self._horovod()
            gathered = hvd.allgather(tensor.unsqueeze(0).contiguous(), process_set=process_set)
        else:
            send = tensor.detach().contiguous()
            gathered = torch.empty((self.size, *send.shape), dtype=send.dtype)
            with watchdog.waiting("tensor-parallel allgather"):
                self.comm.Allgather(send.numpy(), gathered.numpy())
        return torch.cat(list(gathered.unbind(0)), dim=-1)

    def my_slice_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        width = tensor.shape[-1] // self.size
        return tensor[..., self.rank * width : (self.rank + 1) * width].contiguous()


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
    def forward(ctx: Any, x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
        ctx.group = group
        return group.my_slice_last_dim(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.group.allgather_last_dim(grad), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
        ctx.group = group
        return group.allgather_last_dim(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.group.my_slice_last_dim(grad), None


def copy_to_region(x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
    return _ScatterToRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group: TensorCollectives) -> torch.Tensor:
    return _GatherFromRegion.apply(x, group)
