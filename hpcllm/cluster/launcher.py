"""Which launcher started this process, and what it says about our place in the job.

Read from environment variables only, so it works before MPI is initialised and can be tested with a
plain dict. The MPI communicator stays the authority on rank and size; this is what the launcher
*claims*, used to name the launcher, to cross-check MPI, and to pick a device before MPI starts.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from hpcllm.errors import EnvironmentProblem, UsageError


class Launcher(str, Enum):
    OPENMPI = "mpirun (OpenMPI)"
    SLURM = "srun (Slurm)"
    HOROVODRUN = "horovodrun"
    PMI = "mpiexec (MPICH/Intel MPI, PMI)"
    NONE = "none (single process)"


@dataclass(frozen=True)
class LaunchInfo:
    launcher: Launcher
    rank: int
    size: int
    local_rank: int
    local_size: int
    node_index: int | None  # None when the launcher does not say
    slurm_job_id: str | None  # set inside any Slurm allocation, batch script included

    @property
    def is_distributed(self) -> bool:
        return self.launcher is not Launcher.NONE


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def _slurm_local_size(env: Mapping[str, str]) -> int | None:
    # SLURM_STEP_TASKS_PER_NODE looks like "4(x2),3"; our node's entry is picked by SLURM_NODEID.
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = _int(env, "SLURM_NODEID", default=0)
    if not spec:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        if "(x" in part:
            count, repeat = part.rstrip(")").split("(x")
            counts += [int(count)] * int(repeat)
        else:
            counts.append(int(part))
    return counts[node] if node is not None and node < len(counts) else None


def detect(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Name the launcher from its environment variables; most specific first.

    mpirun inside a Slurm allocation is reported as OpenMPI (it owns the ranks); a Slurm batch
    script without srun is a single process, not a Slurm step.
    """
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")

    if "HOROVOD_RANK" in env and "HOROVOD_SIZE" in env:  # horovodrun with the Gloo controller
        return LaunchInfo(
            Launcher.HOROVODRUN,
            rank=int(env["HOROVOD_RANK"]),
            size=int(env["HOROVOD_SIZE"]),
            local_rank=_int(env, "HOROVOD_LOCAL_RANK", default=0),
            local_size=_int(env, "HOROVOD_LOCAL_SIZE", default=1),
            node_index=_int(env, "HOROVOD_CROSS_RANK"),
            slurm_job_id=job,
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchInfo(
            Launcher.OPENMPI,
            rank=int(env["OMPI_COMM_WORLD_RANK"]),
            size=int(env["OMPI_COMM_WORLD_SIZE"]),
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            local_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1),
            node_index=_int(env, "OMPI_COMM_WORLD_NODE_RANK"),
            slurm_job_id=job,
        )
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return LaunchInfo(
            Launcher.SLURM,
            rank=int(env["SLURM_PROCID"]),
            size=_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS", default=1),
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_size=_slurm_local_size(env) or 1,
            node_index=_int(env, "SLURM_NODEID"),
            slurm_job_id=job,
        )
    if "PMI_RANK" in env and "PMI_SIZE" in env:  # MPICH / Intel MPI Hydra
        return LaunchInfo(
            Launcher.PMI,
            rank=int(env["PMI_RANK"]),
            size=int(env["PMI_SIZE"]),
            local_rank=_int(env, "MPI_LOCALRANKID", "PALS_LOCAL_RANKID", default=0),
            local_size=_int(env, "MPI_LOCALNRANKS", "PALS_LOCAL_SIZE", default=1),
            node_index=None,
            slurm_job_id=job,
        )
    return LaunchInfo(Launcher.NONE, 0, 1, 0, 1, 0, job)


# ---- building a launch command ------------------------------------------------------------

# Defaults that make small jobs behave on a workstation: waiting ranks yield the CPU instead of
# spinning (vital when ranks outnumber cores), and no warnings about absent InfiniBand hardware.
OPENMPI_ENV_DEFAULTS = {
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "OMPI_MCA_btl": "^openib",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


def launch_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a launched job: `base` plus the OpenMPI defaults it does not override."""
    env = dict(os.environ if base is None else base)
    for key, value in OPENMPI_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    if os.geteuid() == 0:  # containers run as root; OpenMPI refuses root without these
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def launch_command(ranks: int, launcher: str | None = None, nodes: int | None = None) -> list[str]:
    """The command prefix that starts `ranks` ranks on this machine or allocation (srun: on
    exactly `nodes` nodes, when given).

    `launcher` is "mpirun" or "srun"; by default srun inside a Slurm allocation, mpirun elsewhere
    (the environment variable HPCLLM_LAUNCHER overrides both).
    """
    import shutil

    choice = launcher or os.environ.get("HPCLLM_LAUNCHER")
    if choice is None:
        inside_allocation = bool(os.environ.get("SLURM_JOB_ID")) and shutil.which("srun") is not None
        choice = "srun" if inside_allocation else "mpirun"
    if choice not in ("srun", "mpirun"):
        raise UsageError(f"unknown launcher {choice!r} (HPCLLM_LAUNCHER): use mpirun or srun")
    if shutil.which(choice) is None:
        raise EnvironmentProblem(
            f"{choice} is not on PATH: install OpenMPI (`make setup` does) or load your site's MPI module"
        )
    if choice == "srun":
        spread = [f"--nodes={nodes}"] if nodes else []
        return ["srun", f"--ntasks={ranks}", *spread, "--mpi=pmix", "--overlap", "--kill-on-bad-exit=1"]
    return ["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none"]


def run_launched(
    command: list[str],
    what: str,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
    run_dir: Path | None = None,
) -> str:
    """Run a benchmark's sub-run (one process, or ranks under `launch_command`) and return its
    stdout; a failure or a timeout is an EnvironmentProblem naming `what`, with its stderr's end.
    A failed training run's `run_dir` (every rank's log: the watchdog's stacks) is copied out of
    the benchmark's temporary directory first, and the message says where."""
    import subprocess

    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=launch_env() if env is None else env, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        kept = _kept_note(run_dir, exc.stderr)
        late = f"{what} did not finish in {timeout:g} s: {' '.join(command)}{kept}"
        raise EnvironmentProblem(late) from exc
    if proc.returncode != 0:
        kept = _kept_note(run_dir, proc.stderr)
        raise EnvironmentProblem(
            f"{what} failed (exit {proc.returncode}): {' '.join(command)}{kept}\n{proc.stderr[-2000:]}"
        )
    return proc.stdout


def failed_runs_dir() -> Path:
    """Where benchmarks keep the run directories of failed sub-runs (HPCLLM_FAILED_RUNS, else
    ~/.cache/hpcllm/failed-runs)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hpcllm" / "failed-runs"
    return Path(os.environ.get("HPCLLM_FAILED_RUNS", default))


def keep_failed_run(run_dir: Path) -> Path:
    """Copy a failed run's directory (every rank's log; checkpoints and token files left out) out of
    a temporary one, into `failed_runs_dir()`; returns where it went."""
    import shutil
    import time

    kept = failed_runs_dir() / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.copytree(run_dir, kept, ignore=shutil.ignore_patterns("checkpoints", "*.bin"), dirs_exist_ok=True)
    return kept


def _kept_note(run_dir: Path | None, stderr: str | bytes | None) -> str:
    """Keep a failed run's directory, if there is one, with the launch's whole stderr beside its
    logs (Horovod's own stall report, naming the tensors and ranks it waits for, goes there);
    the note for the error message."""
    if run_dir is None or not run_dir.is_dir():
        return ""
    try:
        kept = keep_failed_run(run_dir)
        text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
        (kept / "launch-stderr.txt").write_text(text)
    except OSError as exc:
        return f" (its run directory could not be kept: {exc})"
    return f" (its run directory, with every rank's log and the launch's stderr, is kept in {kept})"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when its parent (the supervising launcher) dies,
    so a launcher killed by SIGKILL leaves no mpirun or ranks behind (Linux prctl)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(command: list[str], env: Mapping[str, str]) -> int:
    """Run `command` (mpirun ...) and return its exit status, turning a stop request into a
    clean preemption.

    OpenMPI's mpirun, sent SIGTERM or SIGINT, forwards it, SIGKILLs the ranks about two seconds
    later (a checkpoint in progress dies with them) and exits 1; sent SIGUSR2 it only forwards
    it, and returns the ranks' own exit code (75 after the checkpoint). So the first SIGINT,
    SIGTERM or SIGUSR2 reaching the launcher goes on to mpirun as SIGUSR2, a second one as
    SIGTERM (stop now). mpirun runs in its own session, so Ctrl-C in a terminal reaches only
    the launcher, not mpirun and the ranks behind its back.
    """
    import subprocess

    job = subprocess.Popen(command, env=dict(env), start_new_session=True, preexec_fn=_die_with_parent)
    requests = 0

    def forward(_signum: int, _frame: object) -> None:
        nonlocal requests
        requests += 1
        job.send_signal(signal.SIGUSR2 if requests == 1 else signal.SIGTERM)

    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(stop, forward)
    status = job.wait()
    return status if status >= 0 else 128 - status  # killed by signal N: the shell's 128 + N


def main(argv: list[str] | None = None) -> int:
    """`python -m hpcllm.launcher -np N CMD...`: run CMD in N ranks with the workstation defaults;
    SIGINT or SIGTERM asks the ranks to checkpoint and the exit code is theirs (75)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "-np" or not args[1].isdigit():
        print("usage: python -m hpcllm.launcher -np N COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        command = launch_command(int(args[1])) + args[2:]
    except (UsageError, EnvironmentProblem) as exc:
        print(f"hpcllm.launcher: {exc}", file=sys.stderr)
        return exc.exit_code
    return supervise(command, launch_env())


if __name__ == "__main__":
    raise SystemExit(main())
