"""Run one pytest test in N real MPI ranks and collect what every rank reported.

The outer pytest stays a single process. For a test marked `mpi(ranks=N)` it starts
`mpirun -np N python -m pytest NODEID` (or srun inside an allocation); each rank runs the test with
the plugin in *rank mode* (see plugin.py), writes its outcome to `rank-R.json` in a results
directory, and on its timeout dumps every thread's Python stack to `rank-R.stack`. The outer side
waits, kills the whole process tree when the time is up, and turns the files into one verdict.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hpcllm.cluster.launcher import launch_command, launch_env

# Environment that puts a pytest process into rank mode, and tells it where to report.
ENV_RESULTS = "HPCLLM_MPI_RESULTS"
ENV_TIMEOUT = "HPCLLM_MPI_TIMEOUT"
ENV_TMP = "HPCLLM_MPI_TMP"

# After the first rank dumps its stack at the timeout, how long the others get to do the same.
STACK_GRACE_S = 3.0


@dataclass
class RankResult:
    rank: int
    outcome: str  # passed | failed | skipped | xfailed | xpassed (pytest's own words)
    when: str = "call"
    longrepr: str = ""
    sections: list[tuple[str, str]] = field(default_factory=list)
    wasxfail: str | None = None  # the xfail reason, when pytest's xfail applied


@dataclass
class JobResult:
    ranks: int
    returncode: int | None
    timed_out: bool
    duration: float
    results: dict[int, RankResult]
    stacks: dict[int, str]
    output: str

    @property
    def failed_ranks(self) -> list[int]:
        return sorted(r for r, res in self.results.items() if res.outcome == "failed")

    @property
    def missing_ranks(self) -> list[int]:
        return [r for r in range(self.ranks) if r not in self.results]


def result_path(results_dir: Path, rank: int) -> Path:
    return results_dir / f"rank-{rank}.json"


def stack_path(results_dir: Path, rank: int) -> Path:
    return results_dir / f"rank-{rank}.stack"


def write_rank_result(results_dir: Path, result: RankResult) -> None:
    tmp = result_path(results_dir, result.rank).with_suffix(".tmp")
    tmp.write_text(json.dumps(result.__dict__))
    tmp.replace(result_path(results_dir, result.rank))


def _read_results(results_dir: Path, ranks: int) -> dict[int, RankResult]:
    results = {}
    for rank in range(ranks):
        path = result_path(results_dir, rank)
        if path.exists():
            data = json.loads(path.read_text())
            data["sections"] = [tuple(s) for s in data.get("sections", [])]
            results[rank] = RankResult(**data)
    return results


def _read_stacks(results_dir: Path, ranks: int) -> dict[int, str]:
    stacks = {}
    for rank in range(ranks):
        path = stack_path(results_dir, rank)
        if path.exists() and path.stat().st_size:
            stacks[rank] = path.read_text(errors="replace")
    return stacks


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _request_stacks(processes: list[psutil.Process]) -> None:
    """SIGUSR1 to every Python rank: the plugin registered faulthandler on it (a hang before the
    test's own timer started, e.g. in MPI_Init or collection, still leaves a stack)."""
    for proc in processes:
        try:
            if "python" in os.path.basename(proc.exe()):
                proc.send_signal(signal.SIGUSR1)
        except (psutil.Error, OSError):
            pass


def kill_all(processes: list[psutil.Process], timeout: float = 5.0) -> None:
    """SIGKILL every process (those already gone are skipped) and wait for them."""
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=timeout)


def _kill_tree(proc: subprocess.Popen) -> None:
    kill_all(_tree(proc.pid))
    proc.wait()


def run_in_ranks(
    pytest_args: list[str],
    ranks: int,
    timeout: float,
    startup_timeout: float,
    cwd: Path,
    results_dir: Path,
    nodes: int = 1,
    env: dict[str, str] | None = None,
) -> JobResult:
    """Launch `python -m pytest ARGS` in `ranks` ranks; return what each rank reported.

    Ranks dump their stacks `timeout` seconds into the test; the whole tree is killed at the
    latest `startup_timeout` seconds after that (interpreter start-up, imports, collection).
    """
    shared_tmp = results_dir / "tmp"
    shared_tmp.mkdir(parents=True, exist_ok=True)
    env = launch_env(env)
    env.update({ENV_RESULTS: str(results_dir), ENV_TIMEOUT: str(timeout), ENV_TMP: str(shared_tmp)})
    env.setdefault("PYTHONUNBUFFERED", "1")
    prefix = launch_command(ranks, "srun", nodes) if nodes > 1 else launch_command(ranks)
    command = [*prefix, sys.executable, "-m", "pytest", *pytest_args]
    output_file = results_dir / "output.txt"
    start = time.monotonic()
    hard_deadline = start + timeout + startup_timeout
    timed_out = False
    with open(output_file, "wb") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        first_stack_at = None
        while proc.poll() is None:
            time.sleep(0.1)
            now = time.monotonic()
            if first_stack_at is None and _read_stacks(results_dir, ranks):
                first_stack_at = now
            if first_stack_at is not None and (
                now - first_stack_at > STACK_GRACE_S or len(_read_stacks(results_dir, ranks)) == ranks
            ):
                time.sleep(0.5)  # let the last dump finish writing
                timed_out = True
                _kill_tree(proc)
            elif now > hard_deadline:
                timed_out = True
                _request_stacks(_tree(proc.pid))
                time.sleep(STACK_GRACE_S)
                _kill_tree(proc)
    return JobResult(
        ranks=ranks,
        returncode=proc.returncode,
        timed_out=timed_out,
        duration=time.monotonic() - start,
        results=_read_results(results_dir, ranks),
        stacks=_read_stacks(results_dir, ranks),
        output=output_file.read_text(errors="replace"),
    )
