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

Tests written for the other MPI plugins run unchanged (docs/testing.md):
- pytest-isolate-mpi: `mpi(ranks=[1, 2, 4])` runs the test once per rank count (the `mpi_ranks`
  fixture tells which), `timeout=10, unit="s"|"m"|"h"`, and its `mpi_timeout` marker.
- pytest-mpi: `mpi(min_size=N)` runs in N ranks; `mpi_tmp_path` and `mpi_tmpdir` are shared by
  every rank. When pytest-mpi is installed too, the rule is: a session started under mpirun with
  `--with-mpi` or `--only-mpi` is pytest-mpi's (this plugin launches nothing and the tests run in
  the ranks the session already has); any other session is this plugin's, which launches the
  ranks and runs pytest-mpi inside them as if under `mpirun ... --with-mpi`.
Outcomes are pytest's own: xfail, xpass, strict xfail, skip and errors in fixtures end as they
would without the plugin.
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

from hpcllm.testing.outcomes import Verdict, job_verdict, outcome_of, reports
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
DEFAULT_RANKS = 2
TIME_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}  # pytest-isolate-mpi's `unit`
MARKER_KEYS = ("ranks", "timeout", "tp", "pp", "nodes", "min_size", "unit")
PYTEST_MPI = "pytest_mpi"  # pytest-mpi's plugin name (its entry point)


def in_rank() -> bool:
    """True inside a rank launched by the plugin."""
    return ENV_RESULTS in os.environ


def session_belongs_to_pytest_mpi(config: pytest.Config) -> bool:
    """A session pytest-mpi runs: started under mpirun with its --with-mpi or --only-mpi."""
    return bool(getattr(config.option, "with_mpi", False) or getattr(config.option, "only_mpi", False))


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
    """ranks, timeout (s), tp, pp, nodes of an mpi-marked test, in any of the plugins' dialects."""
    marker = item.get_closest_marker("mpi")
    assert marker is not None
    args: dict[str, Any] = {"ranks": None, "timeout": None, "tp": 1, "pp": 1, "nodes": 1}
    args |= {"min_size": None, "unit": "s"}
    for key, value in zip(("ranks", "timeout"), marker.args, strict=False):
        args[key] = value
    unknown = set(marker.kwargs) - set(MARKER_KEYS)
    if unknown:
        raise ValueError(f"unknown mpi marker argument(s) {sorted(unknown)}; known: {', '.join(MARKER_KEYS)}")
    args.update(marker.kwargs)
    limit = item.get_closest_marker("mpi_timeout")  # pytest-isolate-mpi's separate marker
    if limit is not None:
        args.update(limit.kwargs)
    if args["unit"] not in TIME_UNITS:
        raise ValueError(f"mpi marker unit must be one of {', '.join(TIME_UNITS)}, not {args['unit']!r}")
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "mpi_ranks" in callspec.params:  # one of ranks=[...]
        args["ranks"] = callspec.params["mpi_ranks"]
    elif args["ranks"] is None:
        args["ranks"] = args["min_size"] or DEFAULT_RANKS
    if args["timeout"] is None:
        args["timeout"] = float(item.config.getini("mpi_timeout"))
    else:
        args["timeout"] = float(args["timeout"]) * TIME_UNITS[args["unit"]]
    return args


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`mpi(ranks=[1, 2, 4])`: one test per rank count, each with its `mpi_ranks`."""
    marker = metafunc.definition.get_closest_marker("mpi")
    ranks = marker.kwargs.get("ranks") if marker is not None else None
    if isinstance(ranks, list | tuple):
        if "mpi_ranks" not in metafunc.fixturenames:
            metafunc.fixturenames.append("mpi_ranks")
        metafunc.parametrize("mpi_ranks", list(ranks), indirect=True, ids=[f"mpi_ranks={n}" for n in ranks])


# ---- outer side: launch the ranks and turn their files into one report --------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if in_rank() or item.get_closest_marker("mpi") is None or session_belongs_to_pytest_mpi(item.config):
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    job: JobResult | None = None
    try:
        args = _marker_args(item)
    except ValueError as exc:  # a bad marker fails this test, not the session
        verdict = Verdict("failed", str(exc))
    else:
        nodes = int(args["nodes"])
        cluster, why_not = _cluster(item.config, nodes) if nodes > 1 else (None, "")
        if why_not:
            verdict = Verdict("skipped", why_not)
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
            verdict = job_verdict(job, results_dir)
            if verdict.outcome != "failed":
                shutil.rmtree(results_dir, ignore_errors=True)
    for report in reports(item, verdict, job, _teardown_outer(item, nextitem)):
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
    if item.config.pluginmanager.has_plugin(PYTEST_MPI):
        args.append("--with-mpi")  # inside the ranks pytest-mpi runs as under mpirun
    else:  # left out of this session (-p no:pytest_mpi): out of the ranks' too
        args += ["-p", f"no:{PYTEST_MPI}"]
    return args


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
        outcome = outcome_of(report)
        if outcome is None:  # a setup or teardown that passed
            return
        if self.result is None or (outcome == "failed" and self.result.outcome != "failed"):
            skipped = report.skipped and isinstance(report.longrepr, tuple)
            self.result = RankResult(
                rank=self.rank,
                outcome=outcome,
                when=report.when or "call",
                longrepr=report.longrepr[2] if skipped else report.longreprtext,
                sections=list(report.sections),
                wasxfail=getattr(report, "wasxfail", None),
            )
        if outcome in ("failed", "xfailed") and self.world.Get_size() > 1:
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
def mpi_tmp_path(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A directory shared by every rank of this test (tmp_path outside an mpi-marked test)."""
    shared = os.environ.get(ENV_TMP)
    if shared:
        return Path(shared)
    if session_belongs_to_pytest_mpi(request.config):  # the session's own ranks: rank 0's folder for all
        from mpi4py import MPI

        return Path(MPI.COMM_WORLD.bcast(str(tmp_path), root=0))
    return tmp_path


@pytest.fixture
def mpi_tmpdir(mpi_tmp_path: Path) -> Any:
    """mpi_tmp_path as a py.path (pytest-mpi's older spelling)."""
    from _pytest.compat import LEGACY_PATH

    return LEGACY_PATH(mpi_tmp_path)


@pytest.fixture
def mpi_ranks(request: pytest.FixtureRequest) -> int:
    """The number of ranks this test runs in (pytest-isolate-mpi's fixture)."""
    if hasattr(request, "param"):
        return int(request.param)
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


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
