"""An exception on one rank of a plain mpirun job ends the whole job quickly, non-zero."""

import subprocess
import sys
import textwrap
import time

from hpcllm.cluster.launcher import launch_command, launch_env

FAILING_JOB = textwrap.dedent(
    """
    import pathlib, time
    from hpcllm.cluster import runtime

    rt = runtime.init()
    rt.comm.Barrier()
    if rt.rank == 1:
        pathlib.Path("raised_at").write_text(repr(time.time()))
        raise RuntimeError("boom on rank one")
    rt.comm.Barrier()  # rank 0 would wait here forever without the abort hook
    """
)


def test_exception_on_one_rank_aborts_the_job_within_10s(tmp_path):
    (tmp_path / "failing_job.py").write_text(FAILING_JOB)
    command = launch_command(2, "mpirun") + [sys.executable, "-m", "failing_job"]
    proc = subprocess.run(
        command, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=120
    )
    ended_at = time.time()
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "[rank 1] uncaught exception; aborting the job" in output
    assert "RuntimeError: boom on rank one" in output
    since_raise = ended_at - float((tmp_path / "raised_at").read_text())
    assert since_raise < 10, f"the job took {since_raise:.1f} s to end after the exception"
