"""`hpcllm info`: what this installation and this job can do, like `horovodrun --check-build` plus
MPI, torch, CUDA/NCCL and Slurm, and where every rank landed when run under a launcher.

Exits 1 with the fix when something hpcllm needs is missing (Horovod without PyTorch or MPI, say).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hpcllm
from hpcllm.cluster.launcher import Launcher
from hpcllm.parallel.grid import Layout


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # shown when a required check fails
    required: bool = True


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.required and not c.ok]


def _mark(flag: bool) -> str:
    return "X" if flag else " "


def horovod_build() -> tuple[list[str], list[Check]]:
    """The `horovodrun --check-build` table, read from the installed extension without starting it."""
    try:
        import horovod
        import horovod.torch as hvd
    except ImportError as exc:
        # A Horovod that is installed but broken is an install to fix; one that is absent only rules
        # out data parallelism (a run with dp = 1, one GPU say, needs no Horovod).
        installed = importlib.util.find_spec("horovod") is not None
        return [f"Horovod: not importable with PyTorch ({exc}); data parallelism unavailable"], [
            Check(
                "horovod.torch",
                False,
                str(exc),
                "run `make setup` (builds Horovod with PyTorch, MPI, Gloo)",
                required=installed,
            )
        ]

    package = Path(horovod.__file__).parent
    suffix = sysconfig.get_config_var("EXT_SUFFIX")

    def built(ext: str) -> bool:
        # Look for the extension file: importing horovod.tensorflow without it raises.
        names = ("mpi_lib_v2", "mpi_lib") if ext == "torch" else ("mpi_lib",)
        return any((package / ext / f"{name}{suffix}").exists() for name in names)

    flags = {
        "torch": built("torch"),
        "mpi": hvd.mpi_built(),
        "gloo": hvd.gloo_built(),
        "nccl": hvd.nccl_built(),
        "ddl": hvd.ddl_built(),
        "ccl": hvd.ccl_built(),
    }
    lines = [
        f"Horovod v{horovod.__version__}:",
        "  Available Frameworks:",
        f"    [{_mark(built('tensorflow'))}] TensorFlow",
        f"    [{_mark(flags['torch'])}] PyTorch",
        f"    [{_mark(built('mxnet'))}] MXNet",
        "  Available Controllers:",
        f"    [{_mark(flags['mpi'])}] MPI",
        f"    [{_mark(flags['gloo'])}] Gloo",
        "  Available Tensor Operations:",
        f"    [{_mark(bool(flags['nccl']))}] NCCL",
        f"    [{_mark(flags['ddl'])}] DDL",
        f"    [{_mark(flags['ccl'])}] CCL",
        f"    [{_mark(flags['mpi'])}] MPI",
        f"    [{_mark(flags['gloo'])}] Gloo",
    ]
    rebuild = "delete the cached Horovod wheel (~/.cache/hpcllm/wheels) and run `make setup`"
    checks = [
        Check("Horovod PyTorch", flags["torch"], "framework", rebuild),
        Check("Horovod MPI", flags["mpi"], "controller", rebuild),
        Check("Horovod Gloo", flags["gloo"], "controller", rebuild, required=False),
    ]
    return lines, checks


def engine_lines() -> list[str]:
    """Which engine can carry which traffic on which device (`parallel.*_backend`)."""
    import torch
    import torch.distributed as dist

    from hpcllm.training.plan import mpi_takes_cuda_buffers

    try:
        import horovod.torch as hvd

        horovod_cpu, horovod_cuda = True, bool(hvd.nccl_built())
    except ImportError:
        horovod_cpu = horovod_cuda = False
    gloo = dist.is_available() and dist.is_gloo_available()
    nccl = dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()
    cuda_mpi = torch.cuda.is_available() and mpi_takes_cuda_buffers()  # asks ompi_info: only where it matters
    rows = [  # traffic, engine, on CPU, on CUDA, auto picks it on (cpu, cuda)
        ("data parallel", "horovod", horovod_cpu, horovod_cuda, (True, True)),
        ("tensor parallel", "mpi4py", True, cuda_mpi, (True, False)),
        ("tensor parallel", "horovod", horovod_cpu, horovod_cuda, (False, False)),
        ("tensor parallel", "torch", gloo, nccl, (False, True)),
        ("pipeline", "mpi4py", True, cuda_mpi, (True, False)),
        ("pipeline", "torch", gloo, nccl, (False, True)),
    ]
    lines = ["Engines ([X] usable on that device; * = what auto picks there):"]
    for traffic, engine, cpu, cuda, auto in rows:
        marks = [
            f"[{_mark(ok)}]{'*' if picked else ' '} {device}"
            for ok, picked, device in zip((cpu, cuda), auto, ("cpu", "cuda"), strict=True)
        ]
        lines.append(f"    {traffic:<16} {engine:<8} {'  '.join(marks)}")
    if not horovod_cpu:
        lines.append("    (no Horovod: one rank per model replica only, dp = 1; `make setup` builds it)")
    return lines


def torch_lines() -> tuple[list[str], list[Check]]:
    try:
        import torch
    except ImportError as exc:
        return [f"torch: not importable ({exc})"], [Check("torch", False, str(exc), "run `make setup`")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        nccl = (
            ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "no"
        )
        cuda = f"CUDA {torch.version.cuda}: {torch.cuda.device_count()} GPU(s) ({names}); NCCL {nccl}"
    else:
        cuda = "CUDA: no GPU visible (CPU training)"
    return [f"torch {torch.__version__}; {cuda}"], []


def slurm_lines() -> list[str]:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        return ["Slurm: not installed (sbatch not on PATH)"]
    # sbatch --version still wants a configuration; without SLURM_CONF it fails on a DNS lookup.
    try:
        done = subprocess.run([sbatch, "--version"], capture_output=True, text=True, timeout=10)
        version = done.stdout.strip() if done.returncode == 0 else "installed, no cluster configured"
    except (OSError, subprocess.TimeoutExpired):
        version = "installed, version unknown"
    job = os.environ.get("SLURM_JOB_ID")
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if job and nodelist:
        from hpcllm.cluster.slurm import expand_hostlist

        hosts = expand_hostlist(nodelist)
        return [
            f"Slurm: {version}; inside job {job} on {nodelist} ({len(hosts)} node(s): {', '.join(hosts[:8])})"
        ]
    where = (
        f"inside job {job} on {os.environ.get('SLURM_JOB_NODELIST', '?')}"
        if job
        else "not inside an allocation"
    )
    return [f"Slurm: {version}; {where}"]


def mpi_lines() -> tuple[list[str], list[Check], Any]:
    try:
        import mpi4py
        from mpi4py import MPI
    except ImportError as exc:
        return (
            [f"mpi4py: not importable ({exc})"],
            [Check("mpi4py", False, str(exc), "run `make setup`")],
            None,
        )
    levels = {
        MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE",
        MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
        MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED",
        MPI.THREAD_MULTIPLE: "MPI_THREAD_MULTIPLE",
    }
    library = MPI.Get_library_version().strip().splitlines()[0].split(",")[0]
    major, minor = MPI.Get_version()
    level = levels.get(MPI.Query_thread(), "?")
    lines = [f"mpi4py {mpi4py.__version__}; {library} (MPI {major}.{minor}); thread level {level}"]
    checks = [
        Check(
            "MPI thread level",
            MPI.Query_thread() == MPI.THREAD_MULTIPLE,
            level,
            "Horovod shares mpi4py's communicator and needs MPI_THREAD_MULTIPLE; use an MPI built with it",
        )
    ]
    return lines, checks, MPI.COMM_WORLD


def build_report(layout: Layout) -> Report:
    report = Report()
    report.lines.append(
        f"hpcllm {hpcllm.__version__} on Python {platform.python_version()} ({sys.executable})"
    )
    for lines, checks in (torch_lines(), horovod_build()):
        report.lines += lines
        report.checks += checks
    mpi, checks, comm = mpi_lines()
    report.lines += mpi
    report.checks += checks
    report.lines += engine_lines()
    report.lines += slurm_lines()
    if comm is not None:
        report.lines += rank_table(comm, layout)
    return report


def rank_table(comm: Any, layout: Layout) -> list[str]:
    """Where every rank landed and its (pp, dp, tp) place (collective: every rank calls it)."""
    from hpcllm.cluster import runtime as rt

    here = rt.init(abort_on_error=True)
    row = (
        here.rank,
        here.hostnames[here.rank],
        here.node_index,
        here.local_rank,
        str(here.device),
        here.threads,
    )
    rows = comm.gather(row, root=0)
    if here.launch.launcher is Launcher.NONE:
        return ["Launcher: none (single process); run under mpirun -np N or srun for a rank table"]
    lines = [
        f"Launcher: {here.launch.launcher.value}; {here.size} ranks on {here.node_count} node(s); "
        f"grid {layout}",
        *(f"  {line}" for line in here.node_map()),
    ]
    lines.append("  rank  host                  node  local  device  threads   pp  dp  tp")
    for rank, host, node, local, device, threads in rows or []:
        c = layout.coords(rank)
        place = f"{c.pp:>3} {c.dp:>3} {c.tp:>3}"
        lines.append(f"  {rank:>4}  {host:<20}  {node:>4}  {local:>5}  {device:<6}  {threads:>7}  {place}")
    return lines


def main(tp: int = 1, pp: int = 1) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    layout = Layout.for_world(comm.Get_size(), tp=tp, pp=pp)  # bad layout: UsageError, exit 2
    report = build_report(layout)
    if comm.Get_rank() != 0:
        return 1 if report.problems else 0
    print("\n".join(report.lines))
    if report.problems:
        for check in report.problems:
            print(f"hpcllm info: {check.name} missing ({check.detail}); fix: {check.fix}", file=sys.stderr)
        return 1
    print("OK: hpcllm can train here.")
    return 0


def add_parser(commands: Any) -> None:
    info = commands.add_parser(
        "info",
        help="what this installation and job can do (Horovod build, MPI, torch/CUDA, Slurm, ranks)",
        description="Like `horovodrun --check-build`, plus MPI, torch, CUDA/NCCL, Slurm and the rank "
        "placement when run under mpirun or srun. Exits 1 with the fix when something is missing.",
    )
    info.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size for the grid column (default 1)"
    )
    info.add_argument(
        "--pp", type=int, default=1, help="pipeline-parallel size for the grid column (default 1)"
    )
    info.set_defaults(func=lambda args: main(tp=args.tp, pp=args.pp))
