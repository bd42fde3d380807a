"""`mpirun -np N hpcllm bench allreduce`: allreduce time and bandwidth per engine and message size.

Engines, side by side in one run: Horovod (tensor fusion on, the path gradients take) on its MPI
controller and on Gloo (`horovod.controller`; auto's choice on one CPU host), mpi4py
`Allreduce` (the path tensor-parallel activations take on CPU), and torch.distributed (gloo on CPU,
NCCL on GPU). Per size: median time per call over iterations after warm-up, each iteration timed
between barriers and taken as the slowest rank's; algbw = bytes / time, busbw = algbw × 2(n−1)/n
(the nccl-tests convention); and `wrong`, the number of elements that are not the exact sum.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hpcllm.cluster import runtime
from hpcllm.observe import plots

ENGINES = ("horovod", "horovod-gloo", "mpi4py", "torch.distributed")


def sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    out, size = [], min_bytes
    while size <= max_bytes:
        out.append(size)
        size *= factor
    return out


def _iterations(nbytes: int) -> int:
    return max(5, min(50, (64 << 20) // max(nbytes, 1)))


def _engine(name: str, rt: runtime.Runtime, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in ("horovod", "horovod-gloo"):
        from hpcllm.parallel import horovod

        hvd, _, _ = horovod.start(rt.comm, [], {}, "gloo" if name == "horovod-gloo" else "mpi")
        return lambda t: hvd.allreduce(t, op=hvd.Sum, name="bench")
    if name == "mpi4py":
        from mpi4py import MPI

        comm = rt.comm

        def mpi_allreduce(t: torch.Tensor) -> torch.Tensor:
            if t.is_cuda:
                t = t.cpu()
            out = torch.empty_like(t)
            comm.Allreduce(t.numpy(), out.numpy(), op=MPI.SUM)
            return out

        return mpi_allreduce
    import torch.distributed as dist

    from hpcllm.parallel import torch_dist

    torch_dist.init(rt.comm, device.type)

    def torch_allreduce(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    return torch_allreduce


def measure(
    rt: runtime.Runtime,
    engine: str,
    op: Callable[[torch.Tensor], torch.Tensor],
    nbytes: int,
    device: torch.device,
) -> dict[str, Any]:
    """One row: `op` (engine `engine`, started once by `_engine`) at `nbytes`."""
    from mpi4py import MPI

    n = rt.size
    elements = max(1, nbytes // 4)
    tensor = torch.full((elements,), float(rt.rank + 1), device=device)
    expected = n * (n + 1) / 2
    for _ in range(2):
        op(tensor)
    times, wrong = [], 0
    for _ in range(_iterations(nbytes)):
        rt.comm.Barrier()
        start = time.perf_counter()
        result = op(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = rt.comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
        times.append(elapsed)
        wrong = max(wrong, int((result != expected).sum()))
    wrong = rt.comm.allreduce(wrong, op=MPI.MAX)
    seconds = statistics.median(times)
    algbw = elements * 4 / seconds / 1e9
    return {
        "engine": engine,
        "bytes": elements * 4,
        "ranks": n,
        "time_us": seconds * 1e6,
        "algbw_gbps": algbw,
        "busbw_gbps": algbw * 2 * (n - 1) / n,
        "wrong": wrong,
        "min_us": min(times) * 1e6,
        "max_us": max(times) * 1e6,
    }


def run(min_bytes: int, max_bytes: int, factor: int, engines: tuple[str, ...]) -> list[dict[str, Any]]:
    rt = runtime.init()
    device = rt.device
    rows = []
    # Horovod last: once started, its background thread negotiates every cycle and would steal
    # the CPU from the other engines' measurements on a machine with few cores. Gloo before MPI:
    # Horovod cannot start on Gloo in a process where it ran on MPI (parallel.horovod.start).
    for engine in sorted(engines, key=lambda e: (e.startswith("horovod"), e == "horovod")):
        op = _engine(engine, rt, device)
        for nbytes in sizes(min_bytes, max_bytes, factor):
            rows.append(measure(rt, engine, op, nbytes, device))
        if engine == "torch.distributed":
            import torch.distributed as dist

            dist.destroy_process_group()
    return rows if rt.rank == 0 else []


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'engine':<18} {'bytes':>11} {'ranks':>5} {'time (us)':>11} {'algbw GB/s':>11} "
        f"{'busbw GB/s':>11} {'#wrong':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r['engine']:<18} {r['bytes']:>11,} {r['ranks']:>5} {r['time_us']:>11.1f} "
            f"{r['algbw_gbps']:>11.3f} {r['busbw_gbps']:>11.3f} {r['wrong']:>7}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (left, right) = plots.figure(ncols=2, width=11)
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == engine]
        left.loglog([r["bytes"] for r in mine], [r["time_us"] for r in mine], "o-", label=engine)
        right.semilogx([r["bytes"] for r in mine], [r["busbw_gbps"] for r in mine], "o-", label=engine)
    left.set(xlabel="message size (bytes)", ylabel="time per allreduce (µs)")
    right.set(xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)")
    ranks = rows[0]["ranks"] if rows else 0
    fig.suptitle(f"allreduce, {ranks} ranks, {os.uname().nodename}")
    plots.save(fig, path)
