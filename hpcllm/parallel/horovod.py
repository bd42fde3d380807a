"""Starting Horovod: its environment knobs and its static process sets, in one place.

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


def environment(
    fusion_threshold_mb: float, cycle_time_ms: float, timeline: str = "", hierarchical: bool = False
) -> dict[str, str]:
    """The environment Horovod reads its knobs from when it starts."""
    env = {
        "HOROVOD_FUSION_THRESHOLD": str(int(fusion_threshold_mb * 1024 * 1024)),
        "HOROVOD_CYCLE_TIME": f"{cycle_time_ms:g}",
        "HOROVOD_HIERARCHICAL_ALLREDUCE": "1" if hierarchical else "0",
    }
    if timeline:
        env["HOROVOD_TIMELINE"] = str(Path(timeline).resolve())
    return env


def start(comm: Any, groups: list[list[int]], env: Mapping[str, str]) -> tuple[ModuleType, list[Any]]:
    """Collective: start Horovod on mpi4py's `comm` with one static process set per group (ranks of
    `comm`, the same list in the same order on every rank). Returns horovod.torch and the sets."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise EnvironmentProblem(
            f"Horovod with PyTorch is not importable ({exc}); fix: run `make setup`, "
            "which builds it with PyTorch, MPI and Gloo"
        ) from exc
    if hvd.is_initialized():  # a previous grid in this process: its sets are not ours
        hvd.shutdown()
    os.environ.update(env)
    sets = [hvd.ProcessSet(group) for group in groups]
    hvd.init(comm=comm, process_sets=sets)
    if hvd.size() != comm.Get_size():
        raise EnvironmentProblem(
            f"Horovod sees {hvd.size()} ranks but MPI {comm.Get_size()}: Horovod was built against "
            "another MPI; fix: delete the cached wheel and rerun `make setup`"
        )
    return hvd, sets
