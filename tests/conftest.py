"""hpcllm's own tests use the plugin it ships (registered by its entry point) and pytester."""

import subprocess
import sys

import pytest

from hpcllm.launcher import launch_command, launch_env

pytest_plugins = ["pytester"]

HPCLLM = [sys.executable, "-m", "hpcllm.cli"]


def run_hpcllm(args, ranks=None, timeout=300, env=None, cwd=None):
    """Run `hpcllm ARGS` as a user would: one process, or `ranks` ranks under mpirun."""
    prefix = launch_command(ranks, "mpirun") if ranks else []
    return subprocess.run(
        prefix + HPCLLM + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or launch_env(),
        cwd=cwd,
    )


@pytest.fixture
def hpcllm():
    return run_hpcllm


def assert_usage_error(proc, *needles):
    """Exit 2, and (one process) a single line on stderr that contains every needle."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    first = proc.stderr.strip().splitlines()[0]
    for needle in needles:
        assert needle in first, proc.stderr
