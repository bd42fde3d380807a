"""Checkpoints written in the background (train.async_checkpoint, the default) are the checkpoints
a synchronous save writes, byte for byte, and a run never finishes before its last one is complete.

What a crash during a background write leaves (the previous `latest`) and what preemption waits
for (exit 75 only once the checkpoint is complete) are checked with the default on, by
test_reliability.py's checkpoint-kill and stop-signal tests and by test_chaos.py.
"""

import json

from conftest import losses, sets, train


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
