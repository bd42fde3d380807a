"""The collectives tensor parallelism needs, over one TP group, with one backend switch.

`parallel.tp_backend` (resolved by the plan) picks the engine:
    mpi4py    the TP sub-communicator, in place on the tensor's own memory (numpy views share it:
              no copies); CPU tensors only. Measured fastest on CPU (docs/benchmarks.md).
    horovod   Horovod's allreduce/allgather/reducescatter on the group's static process set (NCCL
              on GPUs; MPI on CPU, so this path runs in the CPU test suite too).
    torch     torch.distributed on the group's process group, built with the grid: NCCL on CUDA
              (device buffers, bf16 natively, no host synchronisation), gloo on CPU (the CPU test
              suite runs this path).
bfloat16 has neither an MPI type nor a Horovod op (nor a gloo reduction), so those reduce it in
float32.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcllm.cluster import watchdog
from hpcllm.parallel.mpi_buffers import mpi_buffer


class TensorCollectives:
    """Sum/max allreduce, allgather and reduce-scatter over one group of ranks."""

    def __init__(
        self,
        comm: Any,
        backend: str = "mpi4py",
        horovod: Any = None,
        process_set: Any = None,
        torch_group: Any = None,
    ):
        """`horovod` (the started `horovod.torch`) and `process_set` are needed for backend horovod,
        `torch_group` (the group's torch.distributed process group) for backend torch."""
        if backend == "horovod" and comm.Get_size() > 1 and (horovod is None or process_set is None):
            raise ValueError("the horovod backend needs the started Horovod and the group's process set")
        if backend == "torch" and comm.Get_size() > 1 and torch_group is None:
            raise ValueError("the torch backend needs the group's torch.distributed process group")
        self.comm = comm
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.backend = backend
        self._hvd = horovod
        self._process_set = process_set
        self._group = torch_group
        self._nccl = backend == "torch" and _is_nccl(torch_group)

    def _wide(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in a dtype the engine reduces: bf16 goes as fp32 except over NCCL."""
        return tensor.float() if tensor.dtype == torch.bfloat16 and not self._nccl else tensor

    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` (contiguous) in place over the group and return it."""
        if self.size == 1:
            return tensor
        work = self._wide(tensor)
        with watchdog.waiting("tensor-parallel allreduce"):
            if self.backend == "torch":
                import torch.distributed as dist

                reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
                dist.all_reduce(work, op=reduce_op, group=self._group)
                return tensor.copy_(work) if work is not tensor else tensor
            if self.backend == "horovod":
                hvd = self._hvd
                reduced = hvd.allreduce(
                    work, op=hvd.Sum if op == "sum" else hvd.Max, process_set=self._process_set
                )
                return tensor.copy_(reduced)
            from mpi4py import MPI

            mpi_op = MPI.SUM if op == "sum" else MPI.MAX
            self.comm.Allreduce(MPI.IN_PLACE, mpi_buffer(work.detach()), op=mpi_op)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def allgather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, in rank order."""
        if self.size == 1:
            return tensor
        send = tensor.detach().contiguous()
        with watchdog.waiting("tensor-parallel allgather"):
            if self.backend == "torch":
                import torch.distributed as dist

                parts = [torch.empty_like(send) for _ in range(self.size)]
                dist.all_gather(parts, send, group=self._group)
                return torch.cat(parts, dim=dim)
            if self.backend == "horovod":
                wide = send.float() if send.dtype == torch.bfloat16 else send
                gathered = self._hvd.allgather(wide.unsqueeze(0), process_set=self._process_set).to(
                    send.dtype
                )
            else:  # moved as bits: MPI has no bfloat16, and a gather needs no arithmetic
                bits = send.view(torch.int16) if send.dtype == torch.bfloat16 else send
                gathered = torch.empty((self.size, *bits.shape), dtype=bits.dtype, device=bits.device)
                self.comm.Allgather(mpi_buffer(bits), mpi_buffer(gathered))
                gathered = gathered.view(send.dtype)
        return torch.cat(list(gathered.unbind(0)), dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum `tensor` over the group and keep this rank's equal part of the sum along `dim`."""
        if self.size == 1:
            return tensor
        # Rank r's part first along a new leading axis: both engines split that axis.
        parts = torch.stack(tensor.detach().chunk(self.size, dim=dim))
        work = self._wide(parts)
        with watchdog.waiting("tensor-parallel reduce-scatter"):
            if self.backend == "torch":
                mine = self._torch_reduce_scatter(work)
            elif self.backend == "horovod":
                hvd = self._hvd
                mine = hvd.reducescatter(work, op=hvd.Sum, process_set=self._process_set)[0]
            else:
                from mpi4py import MPI

                mine = torch.empty(work.shape[1:], dtype=work.dtype, device=work.device)
                self.comm.Reduce_scatter_block(mpi_buffer(work.contiguous()), mpi_buffer(mine), op=MPI.SUM)
        return mine.to(tensor.dtype)

    def _torch_reduce_scatter(self, parts: torch.Tensor) -> torch.Tensor:
        """NCCL reduce-scatters; gloo has no reduce-scatter, so it allreduces and keeps this rank's
        part (the same result, twice the traffic: the CPU test path only)."""
        import torch.distributed as dist

        if self._nccl:
            mine = torch.empty_like(parts[0])
            dist.reduce_scatter_tensor(mine, parts, group=self._group)
            return mine
        summed = parts.contiguous()
        dist.all_reduce(summed, group=self._group)
        return summed[self.rank]

    def my_slice(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This rank's equal part of `tensor` along `dim`."""
        return tensor.chunk(self.size, dim=dim)[self.rank].contiguous()


def _is_nccl(group: Any) -> bool:
    if group is None:
        return False
    import torch.distributed as dist

    return str(dist.get_backend(group)) == "nccl"
