"""pytest plugin: `@pytest.mark.mpi(ranks=N, timeout=S)` runs a test in N real MPI ranks.

Registered through the `pytest11` entry point, so installing hpcllm is enough:

    @pytest.mark.mpi(ranks=2, timeout=30)
    def test_allreduce(comm):
        assert comm.allreduce(1) == 2

The outer pytest process stays single-process and never initialises MPI. For a marked test it
launches the ranks (see ranks.py), waits, and reports one outcome: a failure names the rank and
shows its traceback; a timeout kills every rank and shows each rank's Python stack at the moment
it was stuck. Inside a rank the same plugin runs in *rank mode*: it provides the fixtures `comm`,
`grid`, `runtime` and `mpi_tmp_path`, arms the stack dump timer, and reports back through a file.

Markers: `mpi(ranks=2, timeout=<ini mpi_timeout>, tp=1, pp=1, nodes=1)`; tp and pp shape the `grid`
fixture; `nodes=N > 1` runs the ranks with `srun` across N virtual nodes of the session's local
Slurm cluster (skipped, saying why, where that cluster cannot start).
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _pytest.reports import TestReport

from hpcllm.testing.ranks import (
    ENV_RESULTS,
    ENV_TIMEOUT,
    ENV_TMP,
    JobResult,
    RankResult,
    run_in_ranks,
    stack_path,
    write_rank_result,
)

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_STARTUP_S = 90.0


def in_rank() -> bool:
    """True inside a rank launched by the plugin."""
    return ENV_RESULTS in os.environ


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("mpi_timeout", "default timeout (s) of an mpi-marked test", default=str(DEFAULT_TIMEOUT_S))
    parser.addini(
        "mpi_startup_timeout",
        "extra seconds for launching ranks, imports and collection before a test's timeout starts",
        default=str(DEFAULT_STARTUP_S),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "mpi(ranks=2, timeout=None, tp=1, pp=1, nodes=1): run the test in `ranks` MPI ranks under mpirun "
        "(srun inside a Slurm allocation, or across `nodes` virtual nodes of a local Slurm cluster); "
        "kill all ranks with stack dumps after `timeout` seconds",
    )


def _marker_args(item: pytest.Item) -> dict[str, Any]:
    marker = item.get_closest_marker("mpi")
    assert marker is not None
    args: dict[str, Any] = {"ranks": 2, "timeout": None, "tp": 1, "pp": 1, "nodes": 1}
    for key, value in zip(("ranks", "timeout"), marker.args, strict=False):
        args[key] = value
    unknown = set(marker.kwargs) - set(args)
    if unknown:
        raise ValueError(
            f"unknown mpi marker argument(s) {sorted(unknown)}; known: ranks, timeout, tp, pp, nodes"
        )
    args.update(marker.kwargs)
    if args["timeout"] is None:
        args["timeout"] = float(item.config.getini("mpi_timeout"))
    return args


# ---- outer side: launch the ranks and turn their files into one report --------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if in_rank() or item.get_closest_marker("mpi") is None:
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    job: JobResult | None = None
    try:
        args = _marker_args(item)
    except ValueError as exc:  # a bad marker fails this test, not the session
        outcome, text = "failed", str(exc)
    else:
        nodes = int(args["nodes"])
        cluster, why_not = _cluster(item.config, nodes) if nodes > 1 else (None, "")
        if why_not:
            outcome, text = "skipped", why_not
        else:
            results_dir = Path(tempfile.mkdtemp(prefix="hpcllm-mpi-"))
            job = run_in_ranks(
                _rank_pytest_args(item),
                ranks=int(args["ranks"]),
                timeout=float(args["timeout"]),
                startup_timeout=float(item.config.getini("mpi_startup_timeout")),
                cwd=item.config.rootpath,
                results_dir=results_dir,
                nodes=nodes,
                env=cluster.env if cluster is not None else None,
            )
            outcome, text = _verdict(job, results_dir)
            if outcome != "failed":
                shutil.rmtree(results_dir, ignore_errors=True)
    for report in _reports(item, outcome, text, job, _teardown_outer(item, nextitem)):
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _teardown_outer(item: pytest.Item, nextitem: pytest.Item | None) -> str:
    """Tear down the outer side's module/class fixtures that `nextitem` no longer needs, as
    pytest's own runner does after each test; returns the error text if one failed."""
    try:
        item.session._setupstate.teardown_exact(nextitem)
    except Exception as exc:  # noqa: BLE001 - reported as this test's teardown error
        return f"teardown of outer fixtures failed: {exc!r}"
    return ""


def _rank_pytest_args(item: pytest.Item) -> list[str]:
    args = [item.nodeid, "-qq", "--no-header", "-p", "no:cacheprovider", "-o", "addopts="]
    args += ["--rootdir", str(item.config.rootpath)]
    if item.config.inipath is not None:
        args += ["-c", str(item.config.inipath)]
    return args


def _verdict(job: JobResult, ranks_dir: Path) -> tuple[str, str]:
    """(outcome, longrepr text) of the whole job."""
    tail = job.output[-6000:]
    if job.timed_out:
        parts = [
            f"timed out: killed all {job.ranks} ranks after {job.duration:.1f} s; Python stack of each rank:"
        ]
        for rank in range(job.ranks):
            stack = job.stacks.get(rank)
            status = job.results.get(rank)
            if stack:
                parts.append(f"===== rank {rank} =====\n{stack.rstrip()}")
            elif status is not None:
                parts.append(f"===== rank {rank}: {status.outcome}, was not stuck =====")
            else:
                parts.append(f"===== rank {rank}: no stack (not started or already gone) =====")
        parts.append(f"----- launcher output (tail) -----\n{tail}")
        return "failed", "\n".join(parts)
    if job.failed_ranks:
        parts = []
        for rank in job.failed_ranks:
            res = job.results[rank]
            parts.append(f"rank {rank} of {job.ranks} failed (in {res.when}):\n{res.longrepr}")
        others = [
            f"rank {r}: {job.results[r].outcome}" if r in job.results else f"rank {r}: aborted"
            for r in range(job.ranks)
            if r not in job.failed_ranks
        ]
        if others:
            parts.append("other ranks: " + ", ".join(others))
        return "failed", "\n\n".join(parts)
    if job.missing_ranks:
        return "failed", (
            f"rank(s) {job.missing_ranks} of {job.ranks} reported no result (crashed, or the launcher "
            f"failed; exit code {job.returncode}); rank files kept in {ranks_dir}\n"
            f"----- launcher output (tail) -----\n{tail}"
        )
    if job.returncode != 0:
        return "failed", (
            f"every rank passed, but the launcher exited with {job.returncode} (a rank failed in "
            f"teardown or MPI_Finalize)\n----- launcher output (tail) -----\n{tail}"
        )
    outcomes = {res.outcome for res in job.results.values()}
    if outcomes == {"skipped"}:
        return "skipped", job.results[0].longrepr
    return "passed", ""


def _reports(
    item: pytest.Item, outcome: str, text: str, job: JobResult | None, teardown_error: str
) -> list[TestReport]:
    """setup/call/teardown reports of the whole job; the call carries the captured output of the
    failing ranks (or rank 0's)."""
    sections: list[tuple[str, str]] = []
    if job is not None:
        for rank in job.failed_ranks or ([0] if 0 in job.results else []):
            sections += [(f"{title} (rank {rank})", body) for title, body in job.results[rank].sections]

    def report(when: str, outcome: str, longrepr: Any = None, duration: float = 0.0) -> TestReport:
        return TestReport(
            item.nodeid,
            item.location,
            dict.fromkeys(item.keywords, 1),
            outcome,
            longrepr,
            when,
            sections=sections if when == "call" else [],
            duration=duration,
        )

    if outcome == "skipped":
        path, lineno, _ = item.location
        return [
            report("setup", "skipped", (str(path), (lineno or 0) + 1, text)),
            report("teardown", "passed"),
        ]
    return [
        report("setup", "passed"),
        report("call", outcome, text or None, job.duration if job is not None else 0.0),
        report("teardown", "failed", teardown_error) if teardown_error else report("teardown", "passed"),
    ]


# ---- rank side: run the test, arm the stack dump, report through a file -------------------


class _RankReporter:
    """Collects this rank's reports for the one test it runs and writes them for the outer side."""

    def __init__(self, results_dir: Path, timeout: float):
        from mpi4py import MPI

        self.results_dir = results_dir
        self.timeout = timeout
        self.world = MPI.COMM_WORLD
        self.rank = self.world.Get_rank()
        self.result: RankResult | None = None
        self._stack_file = open(stack_path(results_dir, self.rank), "w")  # noqa: SIM115 - lives with the rank
        faulthandler.register(signal.SIGUSR1, file=self._stack_file, all_threads=True)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[None]:
        faulthandler.dump_traceback_later(self.timeout, exit=False, file=self._stack_file)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()

    def pytest_runtest_logreport(self, report: TestReport) -> None:
        if report.failed or (report.skipped and self.result is None):
            skip_reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
            self.result = RankResult(
                rank=self.rank,
                outcome="failed" if report.failed else "skipped",
                when=report.when or "call",
                longrepr=report.longreprtext if report.failed else skip_reason,
                sections=list(report.sections),
            )
        elif report.when == "call" and self.result is None:
            self.result = RankResult(self.rank, "passed", sections=list(report.sections))
        if report.failed and self.world.Get_size() > 1:
            # Peers may be waiting for us in a collective: report, then end the whole job now.
            write_rank_result(self.results_dir, self.result)
            self._stack_file.close()
            self.world.Abort(1)

    def pytest_sessionfinish(self) -> None:
        if self.result is not None:
            write_rank_result(self.results_dir, self.result)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    if in_rank() and not session.config.pluginmanager.has_plugin("hpcllm-rank-reporter"):
        reporter = _RankReporter(Path(os.environ[ENV_RESULTS]), float(os.environ[ENV_TIMEOUT]))
        session.config.pluginmanager.register(reporter, "hpcllm-rank-reporter")


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def comm() -> Iterator[Any]:
    """A duplicate of MPI.COMM_WORLD for this test (size 1 outside an mpi-marked test)."""
    from mpi4py import MPI

    dup = MPI.COMM_WORLD.Dup()
    yield dup
    dup.Free()


@pytest.fixture
def mpi_tmp_path(tmp_path: Path) -> Path:
    """A directory shared by every rank of this test (tmp_path outside an mpi-marked test)."""
    shared = os.environ.get(ENV_TMP)
    return Path(shared) if shared else tmp_path


@pytest.fixture
def runtime() -> Any:
    """hpcllm's Runtime for this rank (no abort hook: pytest reports the exception instead)."""
    from hpcllm.cluster import runtime as rt

    return rt.init(abort_on_error=False)


@pytest.fixture
def grid(request: pytest.FixtureRequest, runtime: Any) -> Iterator[Any]:
    """The pp × dp × tp grid over all ranks; tp and pp come from the mpi marker."""
    from hpcllm.parallel.grid import Grid

    marker = request.node.get_closest_marker("mpi")
    kwargs = marker.kwargs if marker is not None else {}
    # Horovod starts with the grid, its process sets static, as in training.
    built = Grid(runtime.comm, tp=kwargs.get("tp", 1), pp=kwargs.get("pp", 1), horovod=True)
    yield built
    built.close()


_CLUSTER = pytest.StashKey[Any]()


def _cluster(config: pytest.Config, nodes: int = 1) -> tuple[Any, str]:
    """(the session's local Slurm cluster of `nodes` nodes, started on first use; or why it cannot
    start here). Stopped when the session ends."""
    from hpcllm.testing.slurm_cluster import LocalSlurmCluster, unavailable

    why_not = unavailable()
    if why_not:
        return None, why_not
    if _CLUSTER not in config.stash:
        config.stash[_CLUSTER] = LocalSlurmCluster().start()
    return config.stash[_CLUSTER](nodes), ""


def pytest_unconfigure(config: pytest.Config) -> None:
    cluster = config.stash.get(_CLUSTER, None)
    if cluster is not None:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest) -> Any:
    """A real one-node Slurm cluster on loopback (munged, slurmctld, slurmd), for the session;
    `slurm_cluster(nodes=N)` gives an N-node one (virtual nodes on this machine), started once.

    Needs root and Debian's slurm-wlm and munge; skips, saying why, where they are missing.
    Run client commands with `env=cluster.env` (it sets SLURM_CONF, and TCP between virtual nodes).
    """
    cluster, why_not = _cluster(request.config)
    if why_not:
        pytest.skip(why_not)
    return cluster
