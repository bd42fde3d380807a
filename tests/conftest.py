"""hpcllm's own tests use the plugin it ships (registered by its entry point) and pytester."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hpcllm.cluster.launcher import launch_command, launch_env

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


# A model small enough that a few dozen steps take seconds on 2 cores.
def sets(*assignments):
    """`--set` flags for each key=value."""
    return [item for assignment in assignments for item in ("--set", assignment)]


TINY = sets(
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.global_batch=8",
    "train.micro_batch=2",
    "train.log_every=1",
    "train.eval_every=10",
    "train.eval_steps=2",
    "train.peak_flops=1e9",
    "train.warmup=5",
)


def write_corpus(root):
    rng = np.random.default_rng(1)
    words = ["def", "return", "self", "rank", "(", ")", ":", "\n    ", "x", "=", "1", "tensor", "grad"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (root / f"f{i:02d}.txt").write_text(" ".join(rng.choice(words, size=400)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    write_corpus(root)
    proc = run_hpcllm(["prepare", root, "--tokenizer", "byte", "--out", root / "prepared"])
    assert proc.returncode == 0, proc.stderr
    return root / "prepared"


def folder_variant(source, folder, edit_config=None, drop=()):
    """A copy of the Hugging Face folder `source` at `folder`, without the files named in `drop`,
    its config.json changed in place by `edit_config(config)`: a folder with one thing wrong."""
    folder.mkdir()
    for path in source.iterdir():
        if path.name not in drop:
            (folder / path.name).write_bytes(path.read_bytes())
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def train(data, out, *extra, ranks=None):
    return run_hpcllm(["train", "--data", data, "--out", out, *TINY, *extra], ranks=ranks)


def signal_training_after(data, run, flags, steps_logged, sig, ranks=2, timeout=120, to="ranks"):
    """Start `hpcllm train` under mpirun, wait until `steps_logged` rows are in metrics.jsonl, send
    `sig` and return (exit code, stderr). `to` is who gets it: "ranks" (every rank, as Slurm's
    --signal or scancel would), "mpirun" (the launcher process), or "launcher" (the job is started
    by `python -m hpcllm.launcher` and only that process gets it, as Ctrl-C or `kill` would)."""
    import psutil

    if to == "launcher":
        start = [sys.executable, "-m", "hpcllm.launcher", "-np", str(ranks)]
    else:
        start = launch_command(ranks, "mpirun")
    job = subprocess.Popen(
        start + HPCLLM + ["train", "--data", str(data), "--out", str(run)] + [str(f) for f in flags],
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps_logged):
            assert job.poll() is None and time.monotonic() < deadline, "training ended before the signal"
            time.sleep(0.05)
        if to == "ranks":
            for rank in psutil.Process(job.pid).children(recursive=True):
                if "python" in rank.name():
                    rank.send_signal(sig)
        else:
            job.send_signal(sig)
        _, stderr = job.communicate(timeout=timeout)
    finally:
        job.kill()
    return job.returncode, stderr


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def assert_same_losses(reference, got, label):
    """The equivalence oracle: 1e-5 relative at step 1, 1e-3 relative at every logged step."""
    assert abs(got[1] - reference[1]) <= 1e-5 * reference[1], label
    for step, value in reference.items():
        assert abs(got[step] - value) <= 1e-3 * value, (label, step)


# ---- jobs on the local Slurm cluster ---------------------------------------------------


def submit_env(cluster):
    venv_bin = str(Path(sys.executable).parent)
    # Submissions are recorded under XDG_STATE_HOME: keep this cluster's job ids apart from others'.
    state = str(cluster.root / "state")
    return launch_env(cluster.env) | {"PATH": f"{venv_bin}:{os.environ['PATH']}", "XDG_STATE_HOME": state}


def submit_job(
    cluster, out, *train_args, job_name="tiny", nodes=1, ntasks=2, slurm_flags=("--template", "cpu")
):
    """`hpcllm slurm submit` of a small CPU job on the local cluster; returns (job id, what it said)."""
    flags = [
        "--nodes",
        nodes,
        "--ntasks-per-node",
        ntasks,
        "--gpus-per-node",
        0,
        "--cpus-per-task",
        1,
        "--time",
        "30",
    ]
    proc = run_hpcllm(
        ["slurm", "submit", *slurm_flags, *flags, "--out", out, "--job-name", job_name, "--", *train_args],
        env=submit_env(cluster),
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split()[2]
    assert job.isdigit(), proc.stdout
    return job, proc.stdout


def copy_run_at(run, checkpoint_name, dest):
    """A copy of run directory `run` as it was when `checkpoint_name` was its latest checkpoint
    (config and that checkpoint only), for resuming it another way."""
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", dest / "config.yaml")
    shutil.copytree(run / "checkpoints" / checkpoint_name, dest / "checkpoints" / checkpoint_name)
    (dest / "checkpoints" / "latest").write_text(checkpoint_name)
    return dest


def processes_of(run_dir, grace_s=0.0):
    """Processes still running with `run_dir` on their command line (orphaned ranks), after giving
    them up to `grace_s` seconds to exit."""
    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if str(run_dir) in " ".join(proc.info["cmdline"] or []):
                    found.append(proc)
            except psutil.Error:
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
