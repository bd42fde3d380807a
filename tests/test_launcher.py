"""Launcher detection from the environment alone: every launcher, no MPI needed."""

import subprocess
import sys

import pytest

from hpcllm.cluster.launcher import Launcher, detect, launch_command, launch_env, run_launched
from hpcllm.errors import EnvironmentProblem, UsageError


def test_no_launcher_is_a_single_process():
    info = detect({})
    assert (info.launcher, info.rank, info.size, info.local_rank, info.local_size) == (
        Launcher.NONE,
        0,
        1,
        0,
        1,
    )
    assert not info.is_distributed


def test_openmpi_variables():
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "OMPI_COMM_WORLD_NODE_RANK": "1",
        "SLURM_JOB_ID": "42",  # mpirun inside an allocation: OpenMPI owns the ranks
    }
    info = detect(env)
    assert info.launcher is Launcher.OPENMPI
    assert (info.rank, info.size, info.local_rank, info.local_size, info.node_index) == (5, 8, 1, 4, 1)
    assert info.slurm_job_id == "42"


def test_srun_step_variables():
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "6",
        "SLURM_STEP_NUM_TASKS": "7",
        "SLURM_LOCALID": "2",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4,3",
        "PMIX_RANK": "6",
    }
    info = detect(env)
    assert info.launcher is Launcher.SLURM
    assert (info.rank, info.size, info.local_rank, info.local_size, info.node_index) == (6, 7, 2, 3, 1)


@pytest.mark.parametrize("spec,node,expected", [("4(x3)", 2, 4), ("2(x2),1", 2, 1), ("8", 0, 8)])
def test_slurm_tasks_per_node_forms(spec, node, expected):
    env = {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "9",
        "SLURM_NODEID": str(node),
        "SLURM_STEP_TASKS_PER_NODE": spec,
    }
    assert detect(env).local_size == expected


def test_slurm_batch_script_without_srun_is_one_process():
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}
    info = detect(env)
    assert info.launcher is Launcher.NONE and info.size == 1 and info.slurm_job_id == "7"


def test_horovodrun_gloo_variables():
    env = {
        "HOROVOD_RANK": "3",
        "HOROVOD_SIZE": "4",
        "HOROVOD_LOCAL_RANK": "1",
        "HOROVOD_LOCAL_SIZE": "2",
        "HOROVOD_CROSS_RANK": "1",
    }
    info = detect(env)
    assert info.launcher is Launcher.HOROVODRUN
    assert (info.rank, info.size, info.local_rank, info.local_size, info.node_index) == (3, 4, 1, 2, 1)


def test_mpich_and_intel_mpi_pmi_variables():
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    info = detect(env)
    assert info.launcher is Launcher.PMI
    assert (info.rank, info.size, info.local_rank, info.local_size) == (2, 4, 0, 2)


def test_launch_command_choices(monkeypatch):
    monkeypatch.delenv("HPCLLM_LAUNCHER", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert launch_command(4)[:3] == ["mpirun", "-np", "4"]
    assert launch_command(4, "srun")[:2] == ["srun", "--ntasks=4"]
    with pytest.raises(UsageError, match="unknown launcher"):
        launch_command(2, "aprun")


def test_launching_without_mpirun_on_path_says_how_to_fix(tmp_path):
    env = launch_env() | {"PATH": str(tmp_path)}  # no mpirun, no srun
    proc = subprocess.run(
        [sys.executable, "-m", "hpcllm.launcher", "-np", "2", "hpcllm", "info"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "hpcllm.launcher: mpirun is not on PATH: install OpenMPI (`make setup` does) "
        "or load your site's MPI module"
    )


def test_a_failed_or_hung_sub_run_is_an_environment_problem_not_a_traceback():
    """Benchmarks run their parts through run_launched: stdout back, or one EnvironmentProblem that
    names the part and ends with its stderr (the command line prints it, exit 1)."""
    assert run_launched([sys.executable, "-c", "print('fine')"], "the probe") == "fine\n"
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('out of luck'); sys.exit(3)"]
    with pytest.raises(EnvironmentProblem, match=r"the probe failed \(exit 3\)(.|\n)*out of luck"):
        run_launched(failing, "the probe")
    with pytest.raises(EnvironmentProblem, match="the probe did not finish in 0.5 s"):
        run_launched([sys.executable, "-c", "import time; time.sleep(5)"], "the probe", timeout=0.5)


def test_a_failed_sub_run_keeps_its_run_directory_out_of_the_benchmarks_temporary_one(tmp_path, monkeypatch):
    """The watchdog's report (every rank's stack in logs/rank-N.log) must outlive the benchmark's
    temporary directory: the failed run's directory is copied, checkpoints left out, with the
    launch's whole stderr (where Horovod's own stall report goes)."""
    monkeypatch.setenv("HPCLLM_FAILED_RUNS", str(tmp_path / "kept"))
    run = tmp_path / "tmp" / "hpcllm-2-3"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "rank-1.log").write_text("stack of rank 1")
    (run / "checkpoints").mkdir()
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('Stalled ranks: 1'); sys.exit(70)"]
    with pytest.raises(EnvironmentProblem, match="is kept in .*kept/hpcllm-2-3-") as error:
        run_launched(failing, "the run", run_dir=run)
    (kept,) = (tmp_path / "kept").iterdir()
    assert str(kept) in str(error.value) and (kept / "logs" / "rank-1.log").read_text() == "stack of rank 1"
    assert not (kept / "checkpoints").exists()
    assert (kept / "launch-stderr.txt").read_text() == "Stalled ranks: 1"
