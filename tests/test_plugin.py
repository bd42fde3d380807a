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
