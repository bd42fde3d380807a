"""Starting torch.distributed next to MPI: one process group per TP and PP group, built eagerly.

The `torch` backends of tensor and pipeline parallelism use torch.distributed: NCCL on CUDA (device
buffers, no host copies, bf16 natively), gloo on CPU, so the same code paths run in the CPU test
suite. The rendezvous needs no launcher support: rank 0 picks a free port for the TCP store on its
host and tells the others over MPI. As with the mpi4py communicators and Horovod's process sets,
every group is created when the grid is built, in one order on every rank.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

from hpcllm.errors import EnvironmentProblem


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _rendezvous_address(comm: Any) -> tuple[str, int]:
    """Rank 0's host name (loopback when every rank is on one host) and a free port there, known
    to every rank (collective)."""
    hosts = comm.allgather(socket.gethostname())
    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = int(probe.getsockname()[1])
    host = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
    return host, comm.bcast(port, root=0)


def init(comm: Any, device_type: str, timeout_s: float = 300.0) -> str:
    """Collective over `comm`: start torch.distributed on every rank of it (once per process);
    returns the backend."""
    import torch.distributed as dist

    if not dist.is_available():
        raise EnvironmentProblem("this PyTorch build has no torch.distributed; choose the mpi4py backends")
    backend = backend_for(device_type)
    if dist.is_initialized():
        return backend
    host, port = _rendezvous_address(comm)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{host}:{port}",
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
        timeout=timedelta(seconds=timeout_s),
    )
    return backend


def start(
    comm: Any, device_type: str, groups: dict[str, list[list[int]]], timeout_s: float
) -> dict[str, Any]:
    """Collective over `comm`: torch.distributed on every rank of it, and one process group per
    group of world ranks. Returns, per axis, the group this rank belongs to (None for a group of
    one rank, which communicates with nobody)."""
    import torch.distributed as dist

    backend = init(comm, device_type, timeout_s)
    rank, mine = comm.Get_rank(), {}
    for axis, axis_groups in groups.items():
        for ranks in axis_groups:  # every rank creates every group, in the same order
            group = dist.new_group(ranks, backend=backend) if len(ranks) > 1 else None
            if rank in ranks:
                mine[axis] = group
    return mine


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
