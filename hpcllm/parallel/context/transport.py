"""The context-parallel ring's transport (`parallel.cp_backend`): each rank sends blocks to the
next rank of its CP group and receives from the previous one, several tensors per hop.

    mpi4py  Isend/Irecv on the CP group's communicator (host memory; CPU runs).
    torch   torch.distributed's batched isend/irecv on the CP process group: NCCL on CUDA (device
            to device), gloo on CPU, so the same path runs in the CPU test suite.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcllm.cluster import watchdog
from hpcllm.parallel.mpi_buffers import mpi_buffer


class MpiRing:
    """Point-to-point transfers around the group: send to the next rank, receive from the previous."""

    def __init__(self, comm: Any):
        self.comm, self.size, self.rank = comm, comm.Get_size(), comm.Get_rank()

    def start(self, tensors: list[torch.Tensor], tag: int) -> tuple[list[Any], list[torch.Tensor]]:
        """Begin passing `tensors` on; returns the requests and the buffers the previous rank fills."""
        received = [torch.empty_like(t) for t in tensors]
        requests = []
        for index, (out, into) in enumerate(zip(tensors, received, strict=True)):
            requests.append(
                self.comm.Isend(mpi_buffer(out), dest=(self.rank + 1) % self.size, tag=tag + index)
            )
            requests.append(
                self.comm.Irecv(mpi_buffer(into), source=(self.rank - 1) % self.size, tag=tag + index)
            )
        return requests, received

    @staticmethod
    def finish(requests: list[Any]) -> None:
        from mpi4py import MPI

        with watchdog.waiting("context-parallel ring"):
            MPI.Request.Waitall(requests)


class TorchRing:
    """The same hops over torch.distributed; `world_ranks[i]` is CP rank i's world rank."""

    def __init__(self, group: Any, world_ranks: list[int], rank: int):
        self.group, self.world_ranks = group, world_ranks
        self.size, self.rank = len(world_ranks), rank

    def start(self, tensors: list[torch.Tensor], tag: int) -> tuple[list[Any], list[torch.Tensor]]:
        import torch.distributed as dist

        received = [torch.empty_like(t) for t in tensors]
        after, before = self.world_ranks[(self.rank + 1) % self.size], self.world_ranks[self.rank - 1]
        operations = []
        for index, (out, into) in enumerate(zip(tensors, received, strict=True)):
            operations.append(dist.P2POp(dist.isend, out, after, self.group, tag + index))
            operations.append(dist.P2POp(dist.irecv, into, before, self.group, tag + index))
        return dist.batch_isend_irecv(operations), received

    @staticmethod
    def finish(requests: list[Any]) -> None:
        with watchdog.waiting("context-parallel ring"):
            for work in requests:
                work.wait()


def ring_for(
    backend: str, comm: Any, group: Any = None, world_ranks: list[int] | None = None
) -> MpiRing | TorchRing:
    """The transport for `parallel.cp_backend` (resolved by the plan): the CP group's mpi4py
    communicator, or its torch.distributed group and its ranks' world ranks."""
    if backend == "torch":
        assert group is not None and world_ranks is not None, "the torch ring needs the CP process group"
        return TorchRing(group, world_ranks, comm.Get_rank())
    return MpiRing(comm)
