"""Starting Horovod: its environment knobs, its controller (MPI, or Gloo so that its background
thread never calls MPI) and its static process sets, in one place.

Horovod reads its settings (fusion threshold, cycle time, timeline) from the environment when it
starts, and a process set must exist on every rank before any rank uses it. Both happen here, once,
when the grid is built: every data-parallel (and, for `parallel.tp_backend=horovod`, tensor-parallel)
group becomes a static process set passed to `hvd.init`, as Horovod recommends over dynamic sets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from hpcllm.errors import EnvironmentProblem
from hpcllm.parallel import gloo_rendezvous

# What a start sets beside its `env` (the Gloo rendezvous, the controller's cycle time); cleared
# before another start, so that an MPI start is not taken for a Gloo one.
_GLOO_KEYS = (
    "HOROVOD_CONTROLLER",
    "HOROVOD_CPU_OPERATIONS",
    "HOROVOD_GLOO_RENDEZVOUS_ADDR",
    "HOROVOD_GLOO_RENDEZVOUS_PORT",
    "HOROVOD_RANK",
    "HOROVOD_SIZE",
    "HOROVOD_LOCAL_RANK",
    "HOROVOD_LOCAL_SIZE",
    "HOROVOD_CROSS_RANK",
    "HOROVOD_CROSS_SIZE",
    "HOROVOD_HOSTNAME",
    "HOROVOD_GLOO_TIMEOUT_SECONDS",
    "HOROVOD_CYCLE_TIME",
)


# horovod.cycle_time_ms = 0: per controller. A Gloo cycle negotiates over TCP; at 1 ms its thread
# cost a dp 2 run on 2 cores 13% of its throughput, at 5 ms 4-8% (docs/benchmarks.md).
CYCLE_MS = {"mpi": 1.0, "gloo": 5.0}


def environment(
    fusion_threshold_mb: float, cycle_time_ms: float, timeline: str = "", hierarchical: bool = False
) -> dict[str, str]:
    """The environment Horovod reads its knobs from when it starts (cycle time 0: the controller's
    own, set by `start`)."""
    env = {
        "HOROVOD_FUSION_THRESHOLD": str(int(fusion_threshold_mb * 1024 * 1024)),
        "HOROVOD_HIERARCHICAL_ALLREDUCE": "1" if hierarchical else "0",
    }
    if cycle_time_ms:
        env["HOROVOD_CYCLE_TIME"] = f"{cycle_time_ms:g}"
    if timeline:
        env["HOROVOD_TIMELINE"] = str(Path(timeline).resolve())
    return env


def start(
    comm: Any,
    groups: list[list[int]],
    env: Mapping[str, str],
    controller: str = "mpi",
    timeout_s: float = 600.0,
) -> tuple[ModuleType, list[Any], str]:
    """Collective: start Horovod on mpi4py's `comm` with one static process set per group (ranks of
    `comm`, the same list in the same order on every rank). Returns horovod.torch, the sets and
    the controller it runs on.

    `controller`: "mpi", Horovod negotiates and reduces with MPI on a duplicate of `comm`; "gloo",
    over Gloo's TCP pairs, so its background thread never calls MPI (parallel.gloo_rendezvous), each
    Gloo operation bounded by `timeout_s`; "auto", gloo when every rank is on one host, else mpi
    (across hosts MPI picks the fast network; Gloo takes the interface the host name resolves to)."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise EnvironmentProblem(
            f"Horovod with PyTorch is not importable ({exc}); fix: run `make setup`, "
            "which builds it with PyTorch, MPI and Gloo"
        ) from exc
    hosts = gloo_rendezvous.hosts(comm) if controller in ("auto", "gloo") else []
    if controller == "auto":
        controller = "gloo" if len(set(hosts)) == 1 else "mpi"
    if controller == "gloo" and hvd.mpi_enabled():
        # Horovod's Gloo context would reuse the MPI communicator its last start freed (and abort).
        raise EnvironmentProblem(
            "Horovod cannot start on Gloo in a process where it ran on MPI; start Gloo first, or in a "
            "new process"
        )
    if hvd.is_initialized():  # a previous grid in this process: its sets are not ours
        hvd.shutdown()
    for key in [key for key in os.environ if key in _GLOO_KEYS]:  # a previous start's choice
        del os.environ[key]
    os.environ.update({"HOROVOD_CYCLE_TIME": f"{CYCLE_MS[controller]:g}"} | dict(env))
    sets = [hvd.ProcessSet(group) for group in groups]
    _init(hvd, comm, hosts, sets, controller, timeout_s)
    if hvd.size() != comm.Get_size():
        raise EnvironmentProblem(
            f"Horovod sees {hvd.size()} ranks but MPI {comm.Get_size()}: Horovod was built against "
            "another MPI; fix: delete the cached wheel and rerun `make setup`"
        )
    return hvd, sets, controller


def _init(
    hvd: ModuleType, comm: Any, hosts: list[str], sets: list[Any], controller: str, timeout_s: float
) -> None:
    """`hvd.init` on `controller`, checked against what Horovod says it runs on."""
    if controller == "gloo":
        rendezvous, close = gloo_rendezvous.open_rendezvous(comm, hosts, dict(os.environ), timeout_s)
        os.environ.update(rendezvous)
        hvd.init(process_sets=sets)
        close()
    else:
        hvd.init(comm=comm, process_sets=sets)
    # Horovod reports gloo_enabled() still after a Gloo start was shut down and MPI started.
    running = "mpi" if hvd.mpi_enabled() else "gloo" if hvd.gloo_enabled() else "none"
    if running != controller:
        raise EnvironmentProblem(
            f"Horovod was asked for its {controller} controller but runs on {running}; fix: rerun "
            "`make setup`, which builds Horovod with MPI and Gloo"
        )
