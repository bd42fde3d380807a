"""Handing torch tensors to mpi4py without copies."""

from __future__ import annotations

from typing import Any

import torch


def mpi_buffer(tensor: torch.Tensor) -> Any:
    """What mpi4py reads and writes in place: a numpy view of host memory, or the CUDA tensor
    itself (mpi4py takes it through the CUDA array interface; the plan allows mpi4py on CUDA only
    with a CUDA-aware MPI). The tensor must be contiguous."""
    if tensor.device.type == "cpu":
        return tensor.numpy()
    torch.cuda.current_stream(tensor.device).synchronize()  # MPI reads memory, not the stream
    return tensor
