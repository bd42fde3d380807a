"""Slurm scripts and preemption: hostlists, rendering with hostile input, and a job that is
signalled mid-run checkpointing and resuming to the same final loss.

The one-node Slurm cluster these templates are tested on end to end is not started here yet; the
preemption path is driven with the same signal the templates forward (SIGUSR2) under mpirun.
"""

import json
import signal
import subprocess
import time

import pytest
from conftest import TINY, run_hpcllm, sets, signal_training_after, submit_env, submit_job

from hpcllm.cluster.launcher import launch_env
from hpcllm.cluster.preemption import EXIT_PREEMPTED
from hpcllm.cluster.slurm import JobSpec, expand_hostlist, render
from hpcllm.errors import UsageError


@pytest.mark.parametrize(
    "text,hosts",
    [
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("node1,node2", ["node1", "node2"]),
        ("a[1-2]b[8-9]", ["a1b8", "a1b9", "a2b8", "a2b9"]),
        ("login,cn[009-011]", ["login", "cn009", "cn010", "cn011"]),
        ("single", ["single"]),
    ],
)
def test_hostlist_expansion(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01]", "gpu[a-b]", "gpu[5-2]"])
def test_malformed_hostlists_are_refused(bad):
    with pytest.raises(UsageError):
        expand_hostlist(bad)


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--job-name", "x; rm -rf ~"),
        ("--job-name", "two\nlines"),
        ("--partition", "gpu$(reboot)"),
        ("--account", "acct`id`"),
        ("--partition", "a b"),
        ("--time", "2h"),
        ("--time", "1:2:3:4"),
        ("--out", "runs dir"),
        ("--nodes", "2-1"),
        ("--nodes", "0"),
        ("--nodes", "$(id)"),
    ],
)
def test_hostile_or_malformed_input_exits_2(flag, value):
    proc = run_hpcllm(["slurm", "render", flag, value])
    assert proc.returncode == 2, proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout


def test_train_arguments_are_shell_quoted():
    script = render(JobSpec(train_args=["--set", "data.path=/data/$(whoami); echo pwned"]))
    assert "'data.path=/data/$(whoami); echo pwned'" in script


@pytest.mark.parametrize("template", ["gpu", "gpu-mpirun", "cpu"])
def test_templates_render_the_requested_resources(template, tmp_path):
    proc = run_hpcllm(
        [
            "slurm",
            "render",
            "--template",
            template,
            "--nodes",
            3,
            "--ntasks-per-node",
            4,
            *(["--gpus-per-node", 4] if template != "cpu" else []),
            "--time",
            "1-00:00:00",
            "--partition",
            "gpu",
            "--account",
            "p1",
            "--job-name",
            "run.1",
            "--",
            "--tp",
            "2",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    # Slurm does not create the folder of #SBATCH --output; render does, and says so.
    assert "#SBATCH --output=runs/slurm-%x-%j.out" in script and (tmp_path / "runs").is_dir()
    assert proc.stderr == "hpcllm slurm render: created runs/ for Slurm's log (#SBATCH --output)\n"
    if template == "cpu":  # a CPU partition rejects any GPU request, and its nodes are not GPU-shaped
        assert "--gpus-per-node" not in script and "--cpus-per-task" not in script
    else:
        assert "#SBATCH --cpus-per-task=8" in script
        # Each rank sees its own GPU: Slurm binds one per task (srun), or hpcllm maps local rank i
        # to GPU i among the node's (mpirun inside the allocation).
        gpus = {"gpu": "#SBATCH --gpus-per-task=1", "gpu-mpirun": "#SBATCH --gpus-per-node=4"}
        assert gpus.get(template, "#SBATCH --gpus-per-node=4") in script
        if template == "gpu":
            assert (
                "--gpus-per-node" not in script
                and "srun --mpi=pmix --kill-on-bad-exit=1 --gpus-per-task=1 --gpu-bind=closest" in script
            )
        # Slurm 22.05 and later: srun does not inherit the batch script's --cpus-per-task.
        if template != "gpu-mpirun":
            assert "--cpus-per-task=8 hpcllm train" in script
    for line in (
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=p1",
        "#SBATCH --job-name=run.1",
        "#SBATCH --signal=B:USR2@180",
        "scontrol requeue",
        "#SBATCH --no-kill",
        'sbatch --parsable --dependency=afterany:"$job"',
    ):
        assert line in script, line
    assert "hpcllm train --out" in script and "--tp 2" in script
    launcher = {
        "gpu": "srun --mpi=pmix",
        "gpu-mpirun": "mpirun --map-by ppr:4:node",
        "cpu": "srun --mpi=pmix",
    }
    assert launcher[template] in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell


def test_gpu_templates_run_one_rank_per_gpu():
    with pytest.raises(
        UsageError, match="--ntasks-per-node 8 with --gpus-per-node 4: hpcllm runs one rank per GPU"
    ):
        render(JobSpec(template="gpu", ntasks_per_node=8, gpus_per_node=4))


def test_cpu_template_follows_what_the_user_passed():
    script = render(JobSpec(template="cpu", cpus_per_task=2))
    assert "#SBATCH --cpus-per-task=2" in script and "gpus" not in script
    assert "srun --mpi=pmix --kill-on-bad-exit=1 --cpus-per-task=2 hpcllm train" in script
    with pytest.raises(UsageError, match="--template cpu asks for no GPUs"):
        render(JobSpec(template="cpu", gpus_per_node=2))


def test_array_template_gives_each_task_its_override():
    script = render(JobSpec(template="array", array=["train.lr=1e-3", "train.lr=3e-3"]))
    assert "#SBATCH --array=0-1" in script
    assert "OVERRIDES=(train.lr=1e-3 train.lr=3e-3)" in script
    with pytest.raises(UsageError, match="needs --array"):
        render(JobSpec(template="array"))


@pytest.mark.parametrize("status,continued", [(137, True), (2, False), (0, False)])
def test_a_failed_array_task_continues_as_the_same_task_in_the_same_run_directory(
    tmp_path, status, continued
):
    """The script's own logic, run by bash with `srun` and `sbatch` stand-ins on PATH (the real
    path, on a Slurm cluster that loses a node, is tests/test_multinode.py): a step of a started run
    (its config.yaml written) that fails (137: a node died) starts a continuation job for the same
    array task and run directory; bad input (2) and success (0) do not."""
    script = tmp_path / "sweep.sbatch"
    script.write_text(render(JobSpec(template="array", out="runs", array=["train.lr=1e-3", "train.lr=3e-3"])))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\nexit {status}\n")
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "$@" > sbatch.args; env > sbatch.env; echo 8\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    (tmp_path / "runs" / "job-5-1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "job-5-1" / "checkpoints" / "latest").write_text("step-00000010")
    (tmp_path / "runs" / "job-5-1" / "config.yaml").write_text("train: {}\n")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_JOB_ID": "6",
        "SLURM_ARRAY_JOB_ID": "5",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_NTASKS": "4",
    }
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == (0 if continued else status), done.stderr
    if not continued:
        assert not (tmp_path / "sbatch.args").exists()
        return
    assert "hpcllm: continuing in job 8 (restart 1 of 3)" in done.stderr
    args = (tmp_path / "sbatch.args").read_text().split()
    assert args[:4] == ["--parsable", "--dependency=afterany:6", "--array=1", args[3]]
    assert args[3] == "--export=ALL,HPCLLM_RUN_DIR=runs/job-5-1,HPCLLM_RESTARTS=1"
    assert args[4].endswith("sweep.sbatch")
    assert "SLURM_NTASKS" not in (tmp_path / "sbatch.env").read_text()  # not this job's request


def test_submit_without_sbatch_says_how_to_fix(tmp_path):
    env = launch_env() | {"PATH": "/usr/bin/nonexistent"}
    proc = run_hpcllm(["slurm", "submit", "--out", tmp_path], env=env)
    assert proc.returncode == 2
    assert "sbatch is not on PATH" in proc.stderr and "hpcllm slurm render" in proc.stderr


# ---- preemption: signal → checkpoint → exit 75 → resume → same result ---------------------

LONG = [*TINY, *sets("train.eval_every=0", "train.ckpt_every=0")]


def test_signalled_job_checkpoints_resumes_and_ends_like_an_uninterrupted_one(data_dir, tmp_path):
    steps = 300
    reference = run_hpcllm(
        ["train", "--data", data_dir, "--out", tmp_path / "plain", *LONG, "--steps", steps], ranks=2
    )
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "preempted"
    # SIGUSR2, as the Slurm templates forward it.
    returncode, stderr = signal_training_after(data_dir, run, [*LONG, "--steps", steps], 20, signal.SIGUSR2)
    assert returncode == EXIT_PREEMPTED, stderr
    assert "stopping after step" in stderr and "checkpoint written" in stderr
    stopped_at = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    assert stopped_at < steps

    resumed = run_hpcllm(["train", "--out", run, "--resume"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr

    def final(path):
        return json.loads((path / "metrics.jsonl").read_text().splitlines()[-1])

    assert final(run)["step"] == final(tmp_path / "plain")["step"] == steps
    assert final(run)["loss"] == final(tmp_path / "plain")["loss"]  # bitwise: same layout, CPU


# ---- on a real (one-node, loopback) Slurm cluster -----------------------------------------


def test_submitted_training_runs_to_completion_where_submit_said(slurm_cluster, data_dir, tmp_path):
    job, said = submit_job(slurm_cluster, tmp_path, "--data", data_dir, *TINY, "--steps", 10)
    state = slurm_cluster.wait_job(job)
    slurm_log = tmp_path / f"slurm-tiny-{job}.out"
    assert state == "COMPLETED", slurm_log.read_text() if slurm_log.exists() else state
    run = tmp_path / f"job-{job}"
    assert str(slurm_log) in said and f"{run}/" in said
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 10
    assert (run / "logs" / "rank-0.log").exists() and (run / "logs" / "rank-1.log").exists()
    assert "launcher srun (Slurm)" in (run / "logs" / "rank-1.log").read_text()
    # No --out: submit recorded where the job writes, so status finds the finished job's metrics.
    status = run_hpcllm(["slurm", "status", job], env=submit_env(slurm_cluster))
    assert status.returncode == 0, status.stderr
    assert f"job {job}:" in status.stdout and "latest metrics: step 10" in status.stdout


def test_preempted_job_requeues_resumes_and_matches_the_uninterrupted_run(slurm_cluster, data_dir, tmp_path):
    steps = 300
    plain = run_hpcllm(
        ["train", "--data", data_dir, "--out", tmp_path / "plain", *LONG, "--steps", steps], ranks=2
    )
    assert plain.returncode == 0, plain.stderr

    job, _ = submit_job(
        slurm_cluster, tmp_path, "--data", data_dir, *LONG, "--steps", steps, job_name="preempt"
    )
    run = tmp_path / f"job-{job}"
    deadline = time.monotonic() + 180
    while not (
        (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 20
    ):
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING") and time.monotonic() < deadline
        time.sleep(0.1)
    # What Slurm does before a time limit or on preemption with --signal=B:USR2@N.
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], env=slurm_cluster.env, check=True)
    # The ranks checkpoint and exit 75, the script requeues: the job is pending again.
    slurm_cluster.wait_job(job, states=("PENDING",), timeout=120)
    log = (tmp_path / f"slurm-preempt-{job}.out").read_text()
    assert "requeueing job" in log, log
    # A requeued job starts again by itself once its begin time (cred_expire + 1 s) has come.
    assert slurm_cluster.wait_job(job, timeout=240) == "COMPLETED"
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    reference = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] == reference["step"] == steps
    assert final["loss"] == reference["loss"]
    assert "resumed from" in (run / "logs" / "rank-0.log").read_text()


def test_job_array_runs_one_task_per_override(slurm_cluster, data_dir, tmp_path):
    array = ("--template", "array", "--array", "train.lr=0.001", "--array", "train.lr=0.002")
    job, _ = submit_job(
        slurm_cluster,
        tmp_path,
        "--data",
        data_dir,
        *TINY,
        "--steps",
        3,
        job_name="sweep",
        ntasks=1,
        slurm_flags=array,
    )
    for task, lr in ((0, 0.001), (1, 0.002)):
        assert slurm_cluster.wait_job(f"{job}_{task}") == "COMPLETED"
        config = (tmp_path / f"job-{job}-{task}" / "config.yaml").read_text()
        assert f"lr: {lr}" in config
