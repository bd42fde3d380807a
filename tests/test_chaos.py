"""A run killed again and again at random moments, restarted each time as the batch templates
restart it, ends exactly where an uninterrupted run ends, and leaves no process behind.

The moments are drawn from a seeded generator (HPCLLM_CHAOS_SEED to try others), and each
interruption is one of the things a cluster does to a job: SIGKILL of one rank (the OOM killer, a
lost node), SIGKILL of the launcher, SIGTERM to the launcher (preemption: checkpoint, exit 75), a
kill during start-up, and a kill in the middle of a checkpoint write (HPCLLM_FAULT=checkpoint).
The restart is the templates' rule: `--resume` once the run's config.yaml exists, a new start
before; the same `--data` and flags every time.
"""

import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import HPCLLM, TINY, processes_of, sets

from hpcllm.cluster.launcher import launch_env
from hpcllm.cluster.preemption import EXIT_PREEMPTED

SEED = int(os.environ.get("HPCLLM_CHAOS_SEED", "20261206"))
STEPS = 150  # long enough that no interruption comes too late; the tiny model runs ~100 steps/s
CKPT_EVERY = 5
FLAGS = [
    *TINY,
    # Checkpoints in the background, so that kills land during background writes too.
    *sets(f"train.ckpt_every={CKPT_EVERY}", "train.watchdog_s=30", "train.async_checkpoint=true"),
    "--steps",
    str(STEPS),
    "--quiet",
]
KINDS = ("startup", "rank", "launcher", "preempt", "checkpoint")


STARTED = []  # every job, so that a failing test leaves none running


class Job:
    """One launch of the dp 2 run under `python -m hpcllm.launcher`, its output in a file."""

    def __init__(self, data, run, log, fault=None):
        resume = ["--resume"] if (run / "config.yaml").exists() else []
        command = [sys.executable, "-m", "hpcllm.launcher", "-np", "2", *HPCLLM, "train"]
        command += ["--data", str(data), "--out", str(run), *resume, *FLAGS]
        env = launch_env() | ({"HPCLLM_FAULT": fault} if fault else {})
        self.run, self.log, self.started = run, log, time.time()
        STARTED.append(self)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def ranks(self):
        return [
            p for p in psutil.Process(self.proc.pid).children(recursive=True) if "hpcllm.cli" in p.cmdline()
        ]

    def wait(self, timeout=120):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(
                f"the job did not end in {timeout} s:\n{self.log.read_text()[-3000:]}"
            ) from None

    def wait_for_step(self, step, timeout=120):
        """Until metrics.jsonl reaches `step`; False if the job ended first."""
        metrics, deadline = self.run / "metrics.jsonl", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            # Rows of an earlier attempt do not count: a resumed run first cuts the file back to its
            # checkpoint, so the file is newer than the job once its rows are this job's.
            fresh = metrics.exists() and metrics.stat().st_mtime >= self.started
            rows = metrics.read_text().splitlines() if fresh else []
            if rows and int(rows[-1].split(",")[0].split(":")[1]) >= step:
                return True
            time.sleep(0.01)
        raise AssertionError(f"step {step} not reached in {timeout} s:\n{self.log.read_text()[-3000:]}")


def checkpoint_step(run):
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip().removeprefix("step-")) if latest.exists() else 0


def metrics(run):
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in rows}


def interrupt(kind, rng, data, run, log):
    """Start the job, interrupt it as `kind` at a random moment, and return (exit code, what)."""
    base = checkpoint_step(run)
    if kind == "checkpoint":  # rank R dies after writing its shard of a checkpoint, before it is complete
        step, rank = base + CKPT_EVERY * rng.randint(1, 2), rng.randint(0, 1)
        job = Job(data, run, log, fault=f"checkpoint:rank={rank}:step={step}")
        return job.wait(), f"rank {rank} killed while writing checkpoint {step}"
    job = Job(data, run, log)
    if kind == "startup":
        delay = rng.uniform(0.2, 4.0)
        time.sleep(delay)
        job.proc.kill()
        return job.wait(), f"launcher killed {delay:.1f} s into start-up"
    step = base + rng.randint(2, 12)
    assert job.wait_for_step(step), f"the job ended before step {step}:\n{log.read_text()[-3000:]}"
    if kind == "rank":
        victim = rng.choice(sorted(job.ranks(), key=lambda p: p.pid))
        victim.kill()
        return job.wait(), f"a rank killed at step {step}"
    if kind == "launcher":
        job.proc.kill()
        return job.wait(), f"launcher killed at step {step}"
    job.proc.send_signal(signal.SIGTERM)
    return job.wait(), f"launcher sent SIGTERM at step {step}"


@pytest.fixture
def no_job_left():
    yield
    for job in STARTED:
        if job.proc.poll() is None:
            job.proc.kill()  # the launcher's death ends mpirun and the ranks (PR_SET_PDEATHSIG)
            job.proc.wait()
    STARTED.clear()


def test_a_run_killed_at_random_moments_and_restarted_ends_bitwise_where_an_uninterrupted_one_does(
    data_dir, tmp_path, no_job_left
):
    reference = tmp_path / "reference"
    job = Job(data_dir, reference, tmp_path / "reference.log")
    assert job.wait() == 0, (tmp_path / "reference.log").read_text()[-3000:]

    rng = random.Random(SEED)
    kinds = rng.sample(KINDS, len(KINDS)) + [rng.choice(KINDS)]
    run, history = tmp_path / "run", []
    for attempt, kind in enumerate(kinds):
        log = tmp_path / f"attempt-{attempt}.log"
        try:
            code, what = interrupt(kind, rng, data_dir, run, log)
        except AssertionError as exc:
            raise AssertionError(f"after {history}: {exc}") from None
        history.append(f"{what}: exit {code}")
        expected = EXIT_PREEMPTED if kind == "preempt" else None
        assert code not in (0, 2) and (expected is None or code == expected), (
            history,
            log.read_text()[-3000:],
        )
        assert not processes_of(run, grace_s=10), (history, processes_of(run))
    final = Job(data_dir, run, tmp_path / "final.log")
    assert final.wait() == 0, (history, (tmp_path / "final.log").read_text()[-3000:])
    assert metrics(run) == metrics(reference), history  # every step's loss and val loss, bitwise
    assert checkpoint_step(run) == STEPS and not processes_of(run)
    print("\n".join(history))  # which faults this seed drew, for the log
