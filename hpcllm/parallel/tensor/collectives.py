"""The collectives tensor parallelism needs, over one TP group, with one backend switch.

`parallel.tp_backend` (resolved by the plan) picks the engine:
    mpi4py    the TP sub-communicator, in place on the tensor's own memory (numpy views share it:
              no copies); CPU tensors only. Measured fastest on CPU (docs/benchmarks.md).
    horovod   Horovod's allreduce/allgather/reducescatter on the group's static process set (NCCL
              on GPUs; MPI on CPU, so this path runs in the CPU test suite too).
bfloat16 has neither an MPI type nor a Horovod op, so it is reduced in float32.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcllm.cluster import watchdog


class TensorCollectives:
    """Sum/max allreduce, allgather and reduce-scatter over one group of ranks."""

    def __init__(self, comm: Any, backend: str = "mpi4py", horovod: Any = None, process_set: Any = None):
        """`horovod` (the started `horovod.torch`) and `process_set` are needed for backend horovod."""
        if backend == "horovod" and comm.Get_size() > 1 and (horovod is None or process_set is None):
            raise ValueError("the horovod backend needs the started Horovod and the group's process set")
        self.comm = comm
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.backend = backend
        self._hvd = horovod
        self._process_set = process_set

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` (contiguous) in place over the group and return it."""
        if self.size == 1:
            return tensor
        work = tensor if tensor.dtype != torch.bfloat16 else tensor.float()
        with watchdog.waiting("tensor-parallel allreduce"):
            if self.backend == "horovod":
                hvd = self._hvd
                reduced = hvd.allreduce(
                    work, op=hvd.Sum if op == "sum" else hvd.Max, process_set=self._process_set
                )
                return tensor.copy_(reduced)
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, work.detach().numpy(), op=MPI.SUM if op == "sum" else MPI.MAX)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def allgather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, in rank order."""
        if self.size == 1:
            return tensor
        send = tensor.detach().contiguous()
        with watchdog.waiting("tensor-parallel allgather"):
            if self.backend == "horovod":
                wide = send.float() if send.dtype == torch.bfloat16 else send
                gathered = self._hvd.allgather(wide.unsqueeze(0), process_set=self._process_set).to(
                    send.dtype
                )
            else:
                gathered = torch.empty((self.size, *send.shape), dtype=send.dtype)
                self.comm.Allgather(send.numpy(), gathered.numpy())
        return torch.cat(list(gathered.unbind(0)), dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum `tensor` over the group and keep this rank's equal part of the sum along `dim`."""
        if self.size == 1:
            return tensor
        # Rank r's part first along a new leading axis: both engines split that axis.
        parts = torch.stack(tensor.detach().chunk(self.size, dim=dim))
        work = parts.float() if parts.dtype == torch.bfloat16 else parts
        with watchdog.waiting("tensor-parallel reduce-scatter"):
            if self.backend == "horovod":
                hvd = self._hvd
                mine = hvd.reducescatter(work, op=hvd.Sum, process_set=self._process_set)[0]
            else:
                from mpi4py import MPI

                mine = torch.empty(work.shape[1:], dtype=work.dtype)
                self.comm.Reduce_scatter_block(work.numpy(), mine.numpy(), op=MPI.SUM)
        return mine.to(tensor.dtype)

    def my_slice(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This rank's equal part of `tensor` along `dim`."""
        return tensor.chunk(self.size, dim=dim)[self.rank].contiguous()
