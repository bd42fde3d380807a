"""Checkpoints written in the background (train.async_checkpoint=true; `auto` on GPUs) are the
checkpoints a synchronous save writes, byte for byte; a crash during a background write leaves
`latest` on the previous checkpoint, and a preempted run exits 75 only once its checkpoint is
complete. test_chaos.py kills background writes at random too.
"""

import json
import signal

from conftest import TINY, losses, run_hpcllm, sets, signal_training_after, train

from hpcllm.cluster.launcher import launch_env
from hpcllm.cluster.preemption import EXIT_PREEMPTED

BACKGROUND = sets("train.async_checkpoint=true")


def shards(run, step):
    manifest = json.loads((run / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_text())
    return manifest["shards"]


def test_background_checkpoints_hold_the_bytes_of_synchronous_ones(data_dir, tmp_path):
    """A checkpoint every step: each save waits for the one before, and the step counter, the
    sampler position and every tensor are those of the step the snapshot was taken at."""
    runs = {}
    for mode in ("false", "true"):
        run = tmp_path / f"async-{mode}"
        flags = sets("train.ckpt_every=1", "train.keep=3", f"train.async_checkpoint={mode}")
        proc = train(data_dir, run, *flags, "--steps", 6, ranks=2)
        assert proc.returncode == 0, proc.stderr
        runs[mode] = run
    sync, background = runs["false"], runs["true"]
    assert losses(sync) == losses(background)
    for step in (4, 5, 6):
        assert shards(sync, step) == shards(background, step), step
    assert (background / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert sorted(p.name for p in (background / "checkpoints").iterdir()) == [
        "latest",
        "step-00000004",
        "step-00000005",
        "step-00000006",
    ]
    log = (background / "logs" / "rank-0.log").read_text()
    assert log.count("written in the background") == 6 and "held on the host" in log


def test_a_crash_during_a_background_write_keeps_the_previous_checkpoint(data_dir, tmp_path):
    reference = train(data_dir, tmp_path / "reference", "--steps", 6)
    assert reference.returncode == 0, reference.stderr
    run = tmp_path / "run"
    flags = [*TINY, *BACKGROUND, *sets("train.ckpt_every=2"), "--steps", 6]
    crashed = run_hpcllm(
        ["train", "--data", data_dir, "--out", run, *flags],
        ranks=2,
        timeout=120,
        env=launch_env() | {"HPCLLM_FAULT": "checkpoint:rank=1:step=4"},  # in rank 1's writer thread
    )
    assert crashed.returncode != 0 and "injecting 'checkpoint' at step 4" in crashed.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert list((run / "checkpoints").glob(".tmp-step-00000004-*"))  # the write that never completed
    resumed = run_hpcllm(["train", "--out", run, "--resume"], ranks=2, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(tmp_path / "reference")


def test_preemption_exits_75_only_once_the_background_checkpoint_is_complete(data_dir, tmp_path):
    run = tmp_path / "run"
    flags = [*TINY, *BACKGROUND, *sets("train.ckpt_every=0", "train.eval_every=0"), "--steps", 2000]
    code, stderr = signal_training_after(data_dir, run, flags, 5, signal.SIGTERM, to="launcher")
    assert code == EXIT_PREEMPTED, stderr
    stopped = max(losses(run))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:08d}"
    assert "written in the background" in (run / "logs" / "rank-0.log").read_text()
