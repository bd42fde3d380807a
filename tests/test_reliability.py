"""Faults end a job cleanly, checkpoints survive them, and untrusted files are refused.

Faults are injected into real 2-rank `hpcllm train` jobs under mpirun with HPCLLM_FAULT (see
hpcllm/faults.py); each job has a timeout, so a fault that hangs the job fails the test instead.
docs/reliability.md lists each fault with the time to a clean exit measured here.
"""

import ast
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    TINY,
    assert_usage_error,
    losses,
    processes_of,
    run_hpcllm,
    sets,
    signal_training_after,
    train,
)

from hpcllm.cluster.launcher import launch_command, launch_env
from hpcllm.cluster.preemption import EXIT_PREEMPTED
from hpcllm.cluster.watchdog import EXIT_STALLED

QUIET = [*TINY, *sets("train.eval_every=0", "train.ckpt_every=0")]


def faulty_train(data, out, fault, *extra, steps=8):
    """A 2-rank training with a fault injected; returns (process, seconds from the fault to the exit)."""
    proc = run_hpcllm(
        ["train", "--data", data, "--out", out, *QUIET, "--steps", steps, *extra],
        ranks=2,
        timeout=120,
        env=launch_env() | {"HPCLLM_FAULT": fault},
    )
    ended = time.time()
    injected = re.search(r"HPCLLM_FAULT: injecting .* \(t=([0-9.]+)\)", proc.stderr)
    assert injected, proc.stderr
    return proc, ended - float(injected.group(1))


def assert_job_refuses(proc, needle):
    """A job ended by bad input found after start-up: exit 2, one error line (from rank 0) after
    the log lines, no traceback."""
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcllm train: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_exception_on_rank_1_at_step_3_ends_every_rank_within_10s(data_dir, tmp_path):
    proc, seconds = faulty_train(data_dir, tmp_path / "run", "raise:rank=1:step=3")
    assert proc.returncode != 0
    assert seconds < 10, f"{seconds:.1f} s from the exception to the end of the job"
    # The failing rank's traceback comes first, before the launcher's account of the abort.
    report = proc.stderr.index("[rank 1] uncaught exception; aborting the job")
    assert "InjectedFault: fault injected by HPCLLM_FAULT on rank 1 before step 3" in proc.stderr
    assert "Traceback" not in proc.stderr[:report]
    abort = proc.stderr.find("MPI_ABORT")
    assert abort == -1 or abort > report
    assert not processes_of(tmp_path / "run")


def test_sigkill_of_rank_1_ends_the_job_within_30s_without_orphans(data_dir, tmp_path):
    proc, seconds = faulty_train(data_dir, tmp_path / "run", "kill:rank=1:step=3")
    assert proc.returncode != 0
    assert seconds < 30, f"{seconds:.1f} s from the SIGKILL to the end of the job"
    assert not processes_of(tmp_path / "run")


def test_watchdog_dumps_stacks_and_names_the_rank_that_did_not_arrive(data_dir, tmp_path):
    run = tmp_path / "run"
    proc, seconds = faulty_train(data_dir, run, "hang:rank=1:step=3", *sets("train.watchdog_s=2"))
    assert proc.returncode == EXIT_STALLED, proc.stderr
    assert "watchdog: rank 0 waited more than 2 s in 'gradient reduction (Horovod)' at step 3" in proc.stderr
    assert "did not arrive: rank 1 at step 3, not in a collective" in proc.stderr
    assert seconds < 30, f"{seconds:.1f} s from the stall to the end of the job"
    # Both ranks' stacks are in their logs: rank 1's shows where it hangs, rank 0's where it waits.
    assert "in _fire" in (run / "logs" / "rank-1.log").read_text()
    rank0 = (run / "logs" / "rank-0.log").read_text()
    assert "in synchronize" in rank0
    # Native stacks too (gdb, which setup installs): rank 0's shows Horovod's background thread,
    # or, where gdb may not attach (a locked-down container), one line saying why.
    native = rank0.split("native stacks of every thread")[-1]
    assert native != rank0, rank0[-3000:]
    assert "horovod" in native or "(gdb could not attach" in native or "(gdb failed" in native, native[:3000]
    # On CPU Horovod runs on Gloo (horovod.controller=auto): its background thread is never inside
    # MPI, so the main thread is the only one that blocks there (docs/reliability.md).
    # Horovod's own answer (gloo_enabled) is what the log line names; the background thread is
    # caught asleep between cycles or in Gloo, never in MPI.
    assert "data parallel horovod (gloo)" in rank0
    background = [t for t in native.split("\nThread ") if "BackgroundThreadLoop" in t]
    if "horovod" in native:
        assert len(background) == 1, native[:3000]
        assert not re.search(r"\bP?MPI_|libmpi\.so|ompi_|opal_", background[0]), background[0]
    assert not processes_of(run)


def test_a_non_finite_gradient_skips_the_step_on_every_rank(data_dir, tmp_path):
    """Rank 1's loss of step 3 is NaN, so after the reduction every replica's gradient is: the step
    is skipped everywhere (logged, counted, norm in metrics) and training goes on from unchanged
    parameters, with finite losses after it."""
    run = tmp_path / "nan"
    proc = run_hpcllm(
        ["train", "--data", data_dir, "--out", run, *QUIET, "--steps", 6],
        ranks=2,
        timeout=120,
        env=launch_env() | {"HPCLLM_FAULT": "nan:rank=1:step=3"},
    )
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        assert proc.stderr.count(f"[rank {rank}] step 3: the gradient norm is nan; step skipped") == 1
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert rows[3]["skipped_steps"] == 1 and rows[3]["grad_norm"] != rows[3]["grad_norm"]  # NaN
    assert rows[2]["skipped_steps"] == 0 and 0 < rows[2]["grad_norm"] < 100
    for step in (4, 5, 6):
        assert rows[step]["loss"] == rows[step]["loss"] and rows[step]["skipped_steps"] == 1, step


@pytest.mark.parametrize(
    "sig, to",
    [
        (signal.SIGTERM, "ranks"),
        (signal.SIGTERM, "launcher"),
        (signal.SIGINT, "launcher"),
        (signal.SIGUSR2, "mpirun"),
    ],
    ids=["SIGTERM-ranks", "SIGTERM-launcher", "SIGINT-launcher", "SIGUSR2-mpirun"],
)
def test_a_stop_signal_to_the_launcher_checkpoints_and_exits_75(data_dir, tmp_path, sig, to):
    """The exit code the docs promise, as the shell that started the job sees it: `python -m
    hpcllm.launcher` turns SIGTERM and SIGINT into the SIGUSR2 that mpirun forwards (mpirun's own
    answer to SIGTERM is to kill the ranks and exit 1), and mpirun returns the ranks' 75."""
    run = tmp_path / "run"
    returncode, stderr = signal_training_after(data_dir, run, [*QUIET, "--steps", 2000], 5, sig, to=to)
    assert returncode == EXIT_PREEMPTED, stderr
    assert f"on {'SIGTERM' if to == 'ranks' else 'SIGUSR2'}: checkpoint written" in stderr
    assert (run / "checkpoints" / "latest").read_text().startswith("step-")
    assert not processes_of(run)


# ---- checkpoint durability ------------------------------------------------------------------

CKPT = sets("train.ckpt_every=2", "train.eval_every=0")


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(data_dir, tmp_path):
    reference = train(data_dir, tmp_path / "reference", *CKPT, "--steps", 6, ranks=2)
    assert reference.returncode == 0, reference.stderr
    run = tmp_path / "run"
    # Rank 0 has written its shard of step 4 and dies before the checkpoint is complete.
    proc = run_hpcllm(
        ["train", "--data", data_dir, "--out", run, *TINY, *CKPT, "--steps", 6],
        ranks=2,
        timeout=120,
        env=launch_env() | {"HPCLLM_FAULT": "checkpoint:rank=0:step=4"},
    )
    assert proc.returncode != 0
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000002"
    partial = list(root.glob(".tmp-step-00000004-*"))
    assert partial and list(partial[0].glob("*.safetensors")), "the fault must strike mid-write"

    resumed = run_hpcllm(["train", "--out", run, "--resume"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "a checkpoint write that was interrupted" in (run / "logs" / "rank-0.log").read_text()
    assert not list(root.glob(".tmp-*"))
    assert losses(run)[6] == losses(tmp_path / "reference")[6]  # bitwise: same layout, CPU


@pytest.fixture(scope="module")
def tp2_run(data_dir, tmp_path_factory):
    """A tp=2 run with two shards per checkpoint."""
    run = tmp_path_factory.mktemp("tp2") / "run"
    proc = train(data_dir, run, *CKPT, "--steps", 2, "--tp", 2, ranks=2)
    assert proc.returncode == 0, proc.stderr
    return run


def _copy(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, copy / "checkpoints" / "step-00000002"


@pytest.mark.parametrize("name", ["shard-pp0-tp1.safetensors", "shard-pp0-tp0.json"])
def test_a_flipped_byte_in_any_shard_is_named_on_load(tp2_run, tmp_path, name):
    run, ckpt = _copy(tp2_run, tmp_path)
    data = bytearray((ckpt / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (ckpt / name).write_bytes(bytes(data))
    proc = run_hpcllm(["train", "--out", run, "--resume", "--steps", 4], ranks=2, timeout=120)
    assert_job_refuses(proc, f"{ckpt / name} does not match its checksum")


def test_a_missing_shard_is_named_on_load(tp2_run, tmp_path):
    run, ckpt = _copy(tp2_run, tmp_path)
    (ckpt / "shard-pp0-tp1.safetensors").unlink()
    proc = run_hpcllm(["train", "--out", run, "--resume", "--steps", 4], ranks=2, timeout=120)
    assert_job_refuses(proc, f"checkpoint shard {ckpt / 'shard-pp0-tp1.safetensors'} is missing")


# ---- untrusted files --------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: proof that the pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def solo_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("solo") / "run"
    proc = train(data_dir, run, *CKPT, "--steps", 2)
    assert proc.returncode == 0, proc.stderr
    return run


def test_a_pickle_placed_in_a_checkpoint_is_refused_unopened(solo_run, tmp_path):
    run, ckpt = _copy(solo_run, tmp_path)
    marker = tmp_path / "payload-ran"
    (ckpt / "model.pt").write_bytes(pickle.dumps(_Payload(marker)))
    resume = run_hpcllm(["train", "--out", run, "--resume", "--steps", 4])
    assert_usage_error(resume, f"{ckpt / 'model.pt'} is a pickle-format file", "does not open it")
    generate = run_hpcllm(["generate", "--run", run, "--prompt", "def ", "--max-new-tokens", 2])
    assert_usage_error(generate, "model.pt is a pickle-format file")
    assert not marker.exists()


def test_a_pickle_disguised_as_a_shard_with_a_matching_checksum_is_refused(solo_run, tmp_path):
    run, ckpt = _copy(solo_run, tmp_path)
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(marker))
    shard = ckpt / "shard-pp0-tp0.safetensors"
    shard.write_bytes(payload)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["shards"][shard.name] = hashlib.sha256(payload).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    proc = run_hpcllm(["train", "--out", run, "--resume", "--steps", 4])
    assert_job_refuses(proc, f"checkpoint shard {shard} is not a safetensors file")
    assert not marker.exists()


UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def unsafe_loads(source: str) -> list[int]:
    """Line numbers where `source` can run code from a file it loads: any import of a pickle-like
    module (however it is spelled), yaml.load/unsafe_load/Loader, torch.load without weights_only=True."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            if any(alias.name.split(".")[0] in UNPICKLERS for alias in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNPICKLERS:
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "yaml" and node.attr in {"load", "unsafe_load", "Loader", "UnsafeLoader"}:
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            safe = any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords)
            if not safe:
                lines.append(node.lineno)
    return lines


def test_the_unsafe_load_scan_catches_every_spelling():
    for bad in (
        "import pickle",
        "from pickle import loads",
        "from _pickle import loads as l",
        "import marshal as m",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import torch\ntorch.load(path)",
        "import torch\ntorch.load(path, weights_only=False)",
    ):
        assert unsafe_loads(bad), bad
    safe = (
        "import yaml, torch\nyaml.safe_load(text)\ntorch.load(path, weights_only=True)\nx = 'pickle.loads('"
    )
    assert unsafe_loads(safe) == []


def test_nothing_in_hpcllm_unpickles_or_loads_unsafe_yaml():
    """Regression guard for the rules in docs/reliability.md: tensors come from safetensors, any
    torch.load must pass weights_only=True, YAML goes through safe_load."""
    package = Path(__file__).resolve().parent.parent / "hpcllm"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text()
        for number in unsafe_loads(source):
            offenders.append(
                f"{path.relative_to(package.parent)}:{number}: {source.splitlines()[number - 1]}"
            )
    assert len(list(package.rglob("*.py"))) > 40  # the scan saw the package
    assert not offenders, "\n".join(offenders)
    assert os.environ.get("HPCLLM_FAULT") is None  # no test leaks a fault into the others


# ---- bad input that is not covered elsewhere (docs/reliability.md lists every row) ------------


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ("model: [unclosed", "is not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping of sections"),
        ("!!python/object/apply:os.system ['touch pwned']\n", "is not valid YAML"),
    ],
    ids=["missing", "not-yaml", "not-a-mapping", "python-tag"],
)
def test_bad_config_files_are_refused(data_dir, tmp_path, content, message):
    config = tmp_path / "config.yaml"
    if content is not None:
        config.write_text(content)
    proc = train(data_dir, tmp_path / "r", "--config", config)
    assert_usage_error(proc, f"config file {config}", message)
    assert not (tmp_path / "r").exists() and not (tmp_path / "pwned").exists()


def test_resume_of_something_that_is_not_a_resumable_run(data_dir, tmp_path):
    proc = run_hpcllm(["train", "--out", tmp_path / "nothing", "--resume"])
    assert_usage_error(proc, "holds no run (config.yaml missing)", "drop --resume")


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(data_dir, tmp_path):
    """No dead end: rank 0 killed before step 3, before the first checkpoint (step 5). The run
    keeps its config.yaml, so a new start is refused, and --resume (what the batch templates run
    for any started run) trains it again from step 0 with its saved configuration, to the losses
    of a run never interrupted, bitwise."""
    every = sets("train.ckpt_every=5")
    whole = tmp_path / "whole"
    command = ["train", "--data", data_dir, "--out", whole, *QUIET, *every, "--steps", 6]
    assert run_hpcllm(command, ranks=2).returncode == 0
    run = tmp_path / "killed"
    killed, _ = faulty_train(data_dir, run, "kill:rank=0:step=3", *every, steps=6)
    assert killed.returncode != 0 and (run / "config.yaml").is_file()
    assert not (run / "checkpoints" / "latest").exists()
    assert_usage_error(train(data_dir, run, "--steps", 6), "already holds a run; pass --resume")
    resumed = run_hpcllm(["train", "--out", run, "--resume"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "has no complete checkpoint yet; starting it again from step 0" in resumed.stderr
    assert losses(run) == losses(whole)


@pytest.mark.parametrize(
    "spec", ["explode:rank=1:step=3", "kill:rank=one:step=3", "kill:step=3", "kill:rank=1:node=1:step=3"]
)
def test_a_malformed_fault_specification_is_refused(data_dir, tmp_path, spec):
    proc = run_hpcllm(
        ["train", "--data", data_dir, "--out", tmp_path / "r", *TINY],
        env=launch_env() | {"HPCLLM_FAULT": spec},
    )
    assert_usage_error(proc, f"HPCLLM_FAULT={spec!r}")
    assert not (tmp_path / "r").exists()


CROSSED_COLLECTIVES = """
from hpcllm.cluster import runtime
from hpcllm.cluster import watchdog

rt = runtime.init()
other = rt.comm.Dup()
watchdog.start(rt.comm, 1.0)
if rt.rank == 0:
    with watchdog.waiting("barrier on the world"):
        rt.comm.Barrier()
else:
    with watchdog.waiting("barrier on a copy"):
        other.Barrier()
"""


def test_watchdog_names_ranks_waiting_in_a_different_collective(tmp_path):
    """Collectives called in a different order on different ranks: a deadlock the watchdog ends."""
    (tmp_path / "crossed.py").write_text(CROSSED_COLLECTIVES)
    proc = subprocess.run(
        launch_command(2, "mpirun") + [sys.executable, "crossed.py"],
        cwd=tmp_path,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_STALLED, proc.stderr
    assert "watchdog: rank 0 waited more than 1 s in 'barrier on the world'" in proc.stderr
    assert "did not arrive: rank 1 at step 0, waiting in 'barrier on a copy'" in proc.stderr


def test_a_timeline_in_a_missing_directory_is_refused(data_dir, tmp_path):
    """Horovod would only log that it cannot open the file and train without a timeline."""
    timeline = tmp_path / "no-such-dir" / "timeline.json"
    proc = train(data_dir, tmp_path / "r", "--timeline", timeline)
    assert_usage_error(proc, f"timeline {timeline}: directory {timeline.parent} does not exist")
    assert not (tmp_path / "r").exists()
    bench = run_hpcllm(["bench", "train", "--data", data_dir, "--timeline", timeline])
    assert_usage_error(bench, "does not exist; create it first")
