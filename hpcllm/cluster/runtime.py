"""Who am I: rank, node, device, threads, seeds, logging, and a job that aborts as one.

`init()` is the first call of every hpcllm entry point. It starts MPI (through mpi4py), learns this
rank's place from the communicator (the launcher's environment is cross-checked, not trusted), picks a
device, seeds the RNGs, sets up rank-aware logging and makes any uncaught exception abort the whole
job instead of leaving the other ranks hanging in a collective. Horovod is started by the grid
(hpcllm.parallel.grid), with every process set, so a world-size-1 run never needs it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hpcllm.cluster.launcher import LaunchInfo, detect
from hpcllm.errors import EnvironmentProblem, UsageError

if TYPE_CHECKING:
    import torch
    from mpi4py import MPI

T = TypeVar("T")
LOGGER_NAME = "hpcllm"
log = logging.getLogger(LOGGER_NAME)


@dataclass
class Runtime:
    launch: LaunchInfo  # what the launcher's environment says
    comm: MPI.Intracomm  # the world communicator hpcllm runs on
    rank: int
    size: int
    local_rank: int
    local_size: int
    node_index: int  # this rank's node, numbered by each node's first rank
    node_of_rank: list[int]  # the node of every rank, by rank (from MPI, not from hostnames)
    hostnames: list[str]  # hostname of every rank, by rank (for people: virtual nodes may share one)
    device: torch.device | None  # None for a job without a model (init(model=False))
    threads: int  # torch intra-op threads on CPU
    seed: int

    @property
    def node_count(self) -> int:
        return max(self.node_of_rank) + 1

    def node_map(self) -> list[str]:
        """One line per node: its index, hostname and ranks."""
        lines = []
        for node in range(self.node_count):
            ranks = [r for r, n in enumerate(self.node_of_rank) if n == node]
            lines.append(f"node {node} ({self.hostnames[ranks[0]]}): ranks {_ranges(ranks)}")
        return lines

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.size} on {self.hostnames[self.rank]} (node {self.node_index}, "
            f"local rank {self.local_rank}/{self.local_size}), launcher {self.launch.launcher.value}, "
            f"device {self.device or 'none (no model)'}, {self.threads} threads"
        )


# ---- MPI ----------------------------------------------------------------------------------


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - setup always installs it
        raise EnvironmentProblem(f"mpi4py is not importable ({exc}); fix: run `make setup`") from exc
    return MPI


def _local_placement(comm: Any, MPI: Any) -> tuple[Any, list[int], list[str]]:
    """The node-local communicator (ranks that share memory share a node) and every rank's node
    index, numbered in order of each node's first rank. Hostnames are gathered for display only:
    containers and virtual nodes can share one, and one host can have several names."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    leader = local.bcast(comm.Get_rank(), root=0)  # the world rank of this node's first rank
    leaders = comm.allgather(leader)
    order = sorted(set(leaders))
    hostnames = comm.allgather(MPI.Get_processor_name())
    return local, [order.index(first) for first in leaders], hostnames


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive ranks
    for rank in ranks:
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _check_launch(launch: LaunchInfo, size: int) -> None:
    if launch.is_distributed and launch.size != size:
        raise EnvironmentProblem(
            f"the launcher ({launch.launcher.value}) started {launch.size} ranks but MPI sees a world of "
            f"{size}: mpi4py is linked against a different MPI than the launcher's. Fix: rebuild mpi4py "
            "with MPICC pointing at the launcher's MPI (`make setup` does this for the system MPI)"
        )


def root_decides(comm: Any, decide: Callable[[], T]) -> T:
    """Rank 0 runs `decide` (reading files, checking input); every rank gets its result, or the same
    UsageError, so a bad input ends every rank alike instead of leaving some in a collective. The
    other ranks sleep meanwhile, leaving their cores to rank 0 (whose work may use several threads)."""
    outcome: tuple[str, Any] | None = None
    if comm.Get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except UsageError as exc:
            outcome = ("usage", str(exc))
    sleeping_barrier(comm)
    outcome = comm.bcast(outcome, root=0)
    if outcome[0] == "usage":
        raise UsageError(outcome[1])
    return outcome[1]


def sleeping_barrier(comm: Any, poll_s: float = 0.001) -> None:
    """A barrier that waits in short sleeps: MPI's own waiting polls at full speed, and on a CPU
    node that takes the cores the ranks still working could use."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_s)


def every_rank_checks(comm: Any, action: Callable[[], T]) -> T:
    """Every rank runs `action` (each on its own files, like its checkpoint shard); if any rank meets
    bad input, every rank raises the first such rank's UsageError, so none is left in a collective."""
    error: str | None = None
    result: Any = None
    try:
        result = action()
    except UsageError as exc:
        error = str(exc)
    first = next((e for e in comm.allgather(error) if e is not None), None)
    if first is not None:
        raise UsageError(first)
    return result


# ---- device, threads, seeds ---------------------------------------------------------------


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(local_size: int, env: dict[str, str] | None = None) -> int:
    """Threads per rank so that the ranks on a node do not oversubscribe its cores.

    An explicit OMP_NUM_THREADS or SLURM_CPUS_PER_TASK wins. If the launcher bound this process to a
    subset of cores, that subset is ours; otherwise the node's cores are shared by its local ranks.
    """
    env = dict(os.environ) if env is None else env
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        if env.get(name, "").isdigit() and int(env[name]) > 0:
            return int(env[name])
    allowed = usable_cores()
    total = os.cpu_count() or allowed
    if allowed < total:
        return allowed
    return max(1, total // max(1, local_size))


def gpu_for_local_rank(local_rank: int, local_size: int, visible: int) -> int:
    """The CUDA device index of this rank: one GPU per local rank. With a single visible GPU each
    rank may have been given its own (Slurm's --gpus-per-task); `check_gpus_not_shared` verifies it."""
    if visible >= local_size:
        return local_rank
    if visible == 1:
        return 0
    raise UsageError(
        f"{local_size} ranks on this node but {visible} GPUs visible: two ranks would share a GPU; "
        f"launch at most {visible} ranks per node (--ntasks-per-node) or make more GPUs visible"
    )


def check_gpus_not_shared(uuids: list[str], node: int) -> None:
    """`uuids`: the GPU of every rank on one node, by local rank."""
    for local_rank, uuid in enumerate(uuids):
        first = uuids.index(uuid)
        if first != local_rank:
            raise UsageError(
                f"local ranks {first} and {local_rank} of node {node} see the same GPU ({uuid}): give each "
                "rank its own (one rank per GPU, e.g. srun --gpus-per-task=1 or CUDA_VISIBLE_DEVICES)"
            )


def choose_device(local: Any, node: int) -> tuple[torch.device, int]:
    """Collective over the node: one CUDA device per local rank when CUDA is present (refusing two
    ranks on one GPU), else CPU with a fair share of the node's cores."""
    import torch

    local_rank, local_size = local.Get_rank(), local.Get_size()
    threads = cpu_threads(local_size)
    torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        return torch.device("cpu"), threads

    def pick() -> int:
        return gpu_for_local_rank(local_rank, local_size, torch.cuda.device_count())

    index = every_rank_checks(local, pick)
    uuids = local.allgather(str(torch.cuda.get_device_properties(index).uuid))
    every_rank_checks(local, lambda: check_gpus_not_shared(uuids, node))
    torch.cuda.set_device(index)
    return torch.device("cuda", index), threads


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def map_large_allocations(megabytes: float) -> bool:
    """glibc: allocations of `megabytes` or more are mapped from the system, and returned to it
    when freed (setting it also stops glibc raising the threshold as large blocks are freed, the
    adaptive rule that keeps freed tensors' memory resident for reuse). False when the C library is
    not glibc; nothing changes then."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(megabytes * (1 << 20))))
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int, torch_too: bool = True) -> None:
    """Same seed on every rank: the model's tensors get the same values everywhere, then are partitioned."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch_too:
        import torch

        torch.manual_seed(seed)  # seeds CUDA devices too


# ---- logging ------------------------------------------------------------------------------


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int, run_dir: str | Path | None = None, level: int = logging.INFO) -> None:
    """Rank 0 logs INFO to the console, other ranks only WARNING and up; each rank logs everything
    down to DEBUG (per-step timings) to logs/rank-N.log."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(min(level, logging.DEBUG) if run_dir is not None else level)
    logger.propagate = False
    # On the handlers, not the logger: records of child loggers (hpcllm.training) skip logger filters.
    rank_filter = _RankFilter(rank)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter("[rank %(rank)d] %(message)s"))
    console.addFilter(rank_filter)
    logger.addHandler(console)
    if run_dir is not None:
        log_dir = Path(run_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_dir / f"rank-{rank}.log")
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s [rank %(rank)d] %(levelname)s %(name)s: %(message)s")
        )
        file_handler.addFilter(rank_filter)
        logger.addHandler(file_handler)


# ---- abort the whole job on an uncaught exception -----------------------------------------


def install_abort_hook(comm: Any, rank: int) -> None:
    """Print the rank and traceback, then MPI_Abort: the other ranks must not wait forever.

    Without this, a rank that raises exits through MPI_Finalize while its peers sit in a
    collective, and the job hangs until the wall-clock limit.
    """
    if comm.Get_size() == 1:
        return

    def abort(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(f"[rank {rank}] uncaught exception; aborting the job:\n{text}")
        sys.stderr.flush()
        log.critical("uncaught exception; aborting the job:\n%s", text)
        for handler in logging.getLogger(LOGGER_NAME).handlers:
            handler.flush()
        # mpirun forwards a rank's output asynchronously: give it a moment to print this report
        # before its own account of the abort, so that the cause reads first.
        time.sleep(0.5)
        comm.Abort(1)

    sys.excepthook = abort
    threading.excepthook = lambda args: abort(args.exc_type, args.exc_value, args.exc_traceback)


# ---- the entry point ----------------------------------------------------------------------


def init(
    seed: int = 0, run_dir: str | Path | None = None, abort_on_error: bool = True, model: bool = True
) -> Runtime:
    """Start this rank: MPI, placement, device, seeds, logging, abort hook. A job without a model
    (`model=False`: prepare) gets no device and never imports torch, which costs each rank 1.5 s."""
    launch = detect()
    MPI = _mpi()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    _check_launch(launch, size)
    local, node_of_rank, hostnames = _local_placement(comm, MPI)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    device: torch.device | None = None
    try:  # a refusal on one node must end the others too: they would wait in the next collective
        if model:
            device, threads = every_rank_checks(comm, lambda: choose_device(local, node_of_rank[rank]))
        else:
            threads = cpu_threads(local_size)
    finally:
        local.Free()
    seed_everything(seed, torch_too=model)
    setup_logging(rank, run_dir)
    faulthandler.enable()  # a segfault in a C extension still shows where each rank was
    if abort_on_error:
        install_abort_hook(comm, rank)
    runtime = Runtime(
        launch=launch,
        comm=comm,
        rank=rank,
        size=size,
        local_rank=local_rank,
        local_size=local_size,
        node_index=node_of_rank[rank],
        node_of_rank=node_of_rank,
        hostnames=hostnames,
        device=device,
        threads=threads,
        seed=seed,
    )
    log.debug("%s", runtime.describe())
    return runtime
