"""Point-to-point transport between neighbouring pipeline stages: mpi4py Isend/Irecv on the
pipeline communicator. Shapes are known up front; sends never block, and each receive names its
source and a tag made of micro-batch and direction, so no schedule order can deadlock."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpcllm.cluster import watchdog


def tag(micro: int, backward: bool) -> int:
    return 2 * micro + int(backward)


@dataclass
class PointToPoint:
    """Non-blocking sends (buffers kept alive until the step ends) and receives of known shape."""

    comm: Any
    pending: list[tuple[Any, np.ndarray]] = field(default_factory=list)
    waited_s: float = 0.0  # time blocked in receives: this stage's share of the bubble

    def send(self, tensor: torch.Tensor, dest: int, tag: int) -> None:
        buffer = tensor.detach().float().cpu().contiguous().numpy()
        self.pending.append((self.comm.Isend(buffer, dest=dest, tag=tag), buffer))

    def recv(self, shape: tuple[int, ...], source: int, tag: int, device: torch.device) -> torch.Tensor:
        buffer = np.empty(shape, dtype=np.float32)
        start = time.perf_counter()
        with watchdog.waiting(f"pipeline receive from rank {source}"):
            self.comm.Irecv(buffer, source=source, tag=tag).Wait()
        self.waited_s += time.perf_counter() - start
        return torch.from_numpy(buffer).to(device)

    def finish(self) -> None:
        from mpi4py import MPI

        start = time.perf_counter()
        with watchdog.waiting("pipeline sends"):
            MPI.Request.Waitall([request for request, _ in self.pending])
        self.waited_s += time.perf_counter() - start
        self.pending.clear()
