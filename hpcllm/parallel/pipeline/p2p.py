"""Point-to-point transport between neighbouring pipeline stages, one class per backend
(`parallel.pp_backend`):

    mpi4py   Isend/Irecv on the pipeline communicator (host buffers on CPU; device buffers with a
             CUDA-aware MPI)
    torch    torch.distributed isend/irecv by world rank: NCCL on CUDA (device to device, no host
             staging), gloo on CPU (the CPU test suite runs this path)

Shapes are known up front and activations travel as fp32 (the residual stream's dtype, also under
bf16 autocast, so nothing is up-cast); sends never block, and each receive names its source and a
tag made of micro-batch and direction, so no schedule order can deadlock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from hpcllm.cluster import watchdog
from hpcllm.parallel.mpi_buffers import mpi_buffer


def tag(micro: int, backward: bool) -> int:
    return 2 * micro + int(backward)


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().contiguous()


@dataclass
class PointToPoint:
    """mpi4py: non-blocking sends (buffers kept alive until the step ends) and receives of known shape."""

    comm: Any
    pending: list[tuple[Any, torch.Tensor]] = field(default_factory=list)
    waited_s: float = 0.0  # time blocked in receives: this stage's share of the bubble

    def send(self, tensor: torch.Tensor, dest: int, tag: int) -> None:
        buffer = _wire(tensor)
        self.pending.append((self.comm.Isend(mpi_buffer(buffer), dest=dest, tag=tag), buffer))

    def recv(self, shape: tuple[int, ...], source: int, tag: int, device: torch.device) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=torch.float32, device=device)
        start = time.perf_counter()
        with watchdog.waiting(f"pipeline receive from rank {source}"):
            self.comm.Irecv(mpi_buffer(buffer), source=source, tag=tag).Wait()
        self.waited_s += time.perf_counter() - start
        return buffer

    def finish(self) -> None:
        from mpi4py import MPI

        start = time.perf_counter()
        with watchdog.waiting("pipeline sends"):
            MPI.Request.Waitall([request for request, _ in self.pending])
        self.waited_s += time.perf_counter() - start
        self.pending.clear()


@dataclass
class TorchPointToPoint:
    """torch.distributed: the same protocol; `world_ranks[s]` is stage s's world rank. On NCCL a
    receive's wait orders the compute stream after it without blocking the host."""

    world_ranks: list[int]
    pending: list[tuple[Any, torch.Tensor]] = field(default_factory=list)
    waited_s: float = 0.0

    def send(self, tensor: torch.Tensor, dest: int, tag: int) -> None:
        import torch.distributed as dist

        buffer = _wire(tensor)
        self.pending.append((dist.isend(buffer, dst=self.world_ranks[dest], tag=tag), buffer))

    def recv(self, shape: tuple[int, ...], source: int, tag: int, device: torch.device) -> torch.Tensor:
        import torch.distributed as dist

        buffer = torch.empty(shape, dtype=torch.float32, device=device)
        start = time.perf_counter()
        with watchdog.waiting(f"pipeline receive from rank {source}"):
            dist.irecv(buffer, src=self.world_ranks[source], tag=tag).wait()
        self.waited_s += time.perf_counter() - start
        return buffer

    def finish(self) -> None:
        start = time.perf_counter()
        with watchdog.waiting("pipeline sends"):
            for work, _ in self.pending:
                work.wait()
        self.waited_s += time.perf_counter() - start
        self.pending.clear()


def link(backend: str, comm: Any, world_ranks: list[int]) -> PointToPoint | TorchPointToPoint:
    """The transport for `parallel.pp_backend` (resolved by the plan)."""
    return TorchPointToPoint(world_ranks) if backend == "torch" else PointToPoint(comm)
