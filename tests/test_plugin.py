"""The pytest plugin itself, run the way a user runs it: an outer pytest on a test file (pytester)."""

import textwrap
import time

import pytest

USER_TESTS = textwrap.dedent(
    """
    import pytest

    @pytest.mark.mpi(ranks=2, timeout=60)
    def test_passes_on_two_ranks(comm, mpi_tmp_path):
        assert comm.Get_size() == 2
        assert comm.allreduce(comm.Get_rank() + 1) == 3
        # The shared directory really is shared: rank 1 reads what rank 0 wrote.
        if comm.Get_rank() == 0:
            (mpi_tmp_path / "hello").write_text("from rank 0")
        comm.Barrier()
        assert (mpi_tmp_path / "hello").read_text() == "from rank 0"

    @pytest.mark.mpi(ranks=2, timeout=60)
    def test_fails_on_rank_one(comm):
        comm.Barrier()
        value = comm.Get_rank() * 10
        assert value == 0, "rank-one-specific failure"

    @pytest.mark.mpi(ranks=2, timeout=8)
    def test_deadlocks(comm):
        # Both ranks wait to receive first: a classic deadlock.
        other = 1 - comm.Get_rank()
        comm.recv(source=other)

    @pytest.mark.mpi(ranks=2, timeout=60)
    def test_skips_on_every_rank(comm):
        pytest.skip("not on this machine")
    """
)


@pytest.fixture
def user_suite(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    return pytester


def test_passing_two_rank_test(user_suite):
    result = user_suite.runpytest_subprocess("-k", "passes_on_two_ranks")
    result.assert_outcomes(passed=1)


def test_failure_on_rank_one_is_reported_as_rank_one(user_suite):
    result = user_suite.runpytest_subprocess("-k", "fails_on_rank_one")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*rank 1 of 2 failed (in call)*", "*rank-one-specific failure*"])
    assert "rank 0 of 2 failed" not in result.stdout.str()


def test_deadlock_fails_at_timeout_with_every_ranks_stack(user_suite):
    start = time.monotonic()
    result = user_suite.runpytest_subprocess("-k", "deadlocks")
    elapsed = time.monotonic() - start
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "timed out: killed all 2 ranks" in out
    for rank in (0, 1):
        section = out.split(f"===== rank {rank} =====", 1)[1]
        assert "in test_deadlocks" in section.split("=====", 1)[0], f"no stack for rank {rank}"
    assert elapsed < 8 + 60, "the timeout must end the test, not CI's limit"


def test_skip_inside_ranks_is_a_skip(user_suite):
    result = user_suite.runpytest_subprocess("-k", "skips_on_every_rank", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*not on this machine*"])


def test_unknown_marker_argument_is_a_clear_error(pytester):
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.mpi(ranks=2, procs=3)
        def test_x():
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    assert "unknown mpi marker argument(s) ['procs']" in result.stdout.str()


OUTCOMES = textwrap.dedent(
    """
    import pytest

    @pytest.mark.mpi(ranks=2)
    @pytest.mark.xfail(reason="known bug")
    def test_xfail_that_fails_in_the_ranks(comm):
        assert False

    @pytest.mark.mpi(ranks=2)
    @pytest.mark.xfail(reason="only rank 1 fails")
    def test_xfail_that_fails_on_rank_one_only(comm):
        comm.Barrier()
        assert comm.Get_rank() == 0

    @pytest.mark.mpi(ranks=2)
    @pytest.mark.xfail(reason="fixed since")
    def test_xpass(comm):
        pass

    @pytest.mark.mpi(ranks=2)
    @pytest.mark.xfail(strict=True, reason="must fail")
    def test_strict_xpass(comm):
        pass

    @pytest.mark.mpi(ranks=2)
    @pytest.mark.skip(reason="marked skip")
    def test_marked_skip(comm):
        pass

    @pytest.fixture
    def broken():
        raise RuntimeError("the fixture broke")

    @pytest.mark.mpi(ranks=2)
    def test_error_in_a_fixture(broken):
        pass
    """
)


def test_outcomes_are_pytests_own(pytester):
    """xfail, xpass, strict xfail, skip and a fixture's error end as they would without the plugin."""
    pytester.makepyfile(test_outcomes=OUTCOMES)
    result = pytester.runpytest_subprocess("-p", "no:pytest_mpi", "-rxXs")
    result.assert_outcomes(xfailed=2, xpassed=1, failed=1, skipped=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_error_in_a_fixture*",
            "*XPASS(strict)*must fail*",
            "XFAIL *test_xfail_that_fails_in_the_ranks - known bug",
            "XPASS *test_xpass - fixed since",
            "SKIPPED*marked skip",
        ]
    )


# Written after the documented usage of pytest-isolate-mpi (ranks lists, timeout with unit,
# mpi_ranks) and pytest-mpi (min_size, mpi_tmpdir / mpi_tmp_path).
ISOLATE_MPI_STYLE = textwrap.dedent(
    """
    import time

    import pytest
    from mpi4py import MPI

    @pytest.mark.mpi(ranks=[1, 2, 3])
    def test_number_of_processes_matches_ranks(mpi_ranks):
        assert MPI.COMM_WORLD.Get_size() == mpi_ranks

    @pytest.mark.mpi(ranks=2, timeout=5, unit="s")
    def test_timeout(mpi_ranks, comm):
        for _ in range(60):
            time.sleep(1)
    """
)
PYTEST_MPI_STYLE = textwrap.dedent(
    """
    import pytest

    @pytest.mark.mpi(min_size=2)
    def test_size():
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        assert comm.size >= 2

    @pytest.mark.mpi(min_size=2)
    def test_shared_folders(mpi_tmpdir, mpi_tmp_path):
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        if comm.rank == 0:
            mpi_tmpdir.join("from-0").write("hello")
        comm.Barrier()
        assert (mpi_tmp_path / "from-0").read_text() == "hello"
        assert str(mpi_tmpdir) == str(mpi_tmp_path)
    """
)


def test_pytest_isolate_mpi_tests_run_unchanged(pytester):
    pytester.makepyfile(test_isolate_style=ISOLATE_MPI_STYLE)
    start = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:pytest_mpi", "-v")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*test_number_of_processes_matches_ranks?mpi_ranks=3? PASSED*"])
    assert "timed out: killed all 2 ranks" in result.stdout.str()
    assert time.monotonic() - start < 5 * 60, "timeout=5, unit='s' is seconds"


def test_pytest_mpi_tests_run_with_and_without_pytest_mpi_installed(pytester):
    """The rule when both are installed: a plain session is hpcllm's (it launches the ranks, with
    pytest-mpi working inside them); `mpirun ... pytest --with-mpi` is pytest-mpi's."""
    import subprocess
    import sys

    from hpcllm.cluster.launcher import launch_command, launch_env

    pytester.makepyfile(test_pytest_mpi_style=PYTEST_MPI_STYLE)
    pytester.runpytest_subprocess("-p", "no:pytest_mpi").assert_outcomes(passed=2)
    both = pytester.runpytest_subprocess()  # pytest-mpi is installed next to hpcllm (make setup)
    both.assert_outcomes(passed=2)
    under_mpirun = subprocess.run(
        [
            *launch_command(2, "mpirun"),
            sys.executable,
            "-m",
            "pytest",
            "--with-mpi",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=300,
        env=launch_env(),
    )
    assert under_mpirun.returncode == 0, under_mpirun.stdout + under_mpirun.stderr
    assert under_mpirun.stdout.count("2 passed") == 2, under_mpirun.stdout  # each of the 2 ranks ran both
    assert "MPI Information" in under_mpirun.stdout  # pytest-mpi's own summary: it ran the session
