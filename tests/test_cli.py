"""The `hpcllm` command: info, and bad input as one line with exit code 2."""

import subprocess
import sys

from hpcllm.launcher import launch_command, launch_env

HPCLLM = [sys.executable, "-m", "hpcllm.cli"]


def run(args, ranks=None, timeout=120):
    command = HPCLLM + args if ranks is None else launch_command(ranks, "mpirun") + HPCLLM + args
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=launch_env())


def test_info_shows_horovod_with_pytorch_mpi_and_gloo():
    proc = run(["info"])
    assert proc.returncode == 0, proc.stderr
    for line in (
        "[X] PyTorch",
        "[X] MPI",
        "[X] Gloo",
        "thread level MPI_THREAD_MULTIPLE",
        "OK: hpcllm can train",
    ):
        assert line in proc.stdout


def test_info_under_mpirun_shows_every_rank():
    proc = run(["info"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert "Launcher: mpirun (OpenMPI); 2 ranks on 1 node(s)" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1"]


def test_bad_arguments_give_one_line_and_exit_2():
    for args in (["info", "--bogus"], ["no-such-command"], []):
        proc = run(args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], (args, proc.stderr)
