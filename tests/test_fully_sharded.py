"""Fully sharded data parallelism (parallel.zero = 3): every layout against the single-process run
on the same seed and data, checkpoints that resume at the same layout bitwise and at others within
the oracle, and the memory contract counted from each rank's live parameter storage."""

import json

import pytest
from conftest import assert_same_losses, copy_run_at, losses, run_hpcllm, sets
from test_memory import train_run

from hpcllm.errors import UsageError
from hpcllm.parallel.layout import Layout
from hpcllm.training.plan import check_hybrid_sharding

ZERO3 = sets("parallel.zero=3")
EVERY_10 = sets("train.ckpt_every=10")


def resume(run, name, dest, ranks, *flags):
    copy = copy_run_at(run, "step-00000010", dest)
    proc = run_hpcllm(["train", "--out", copy, "--resume", *flags], ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = losses(copy)
    assert sorted(got) == list(range(11, 21)), name
    return got


def test_zero3_layouts_match_one_process_and_checkpoints_resume_anywhere(data_dir, tmp_path):
    """dp 2 and dp 4; tp 2 x dp 2 with sequence parallelism and full recomputation; pp 2 x dp 2
    (the tied embedding on both stages) accumulating two micro-batches' gradients whole
    (parallel.reduce_every=2). Then the checkpoints: zero 3 resumed at the same layout (bitwise),
    at another dp (share by share), in one process without sharding, at another tp/pp; a zero 0
    checkpoint resumed at zero 3."""
    reference = train_run(data_dir, tmp_path / "one", None, *EVERY_10)
    cases = {
        "dp2": (2, [*ZERO3, *EVERY_10]),
        "dp4": (4, [*ZERO3, *EVERY_10]),
        "tp2xdp2-sp-full": (
            4,
            ["--tp", 2, *ZERO3, *EVERY_10, *sets("parallel.sequence_parallel=true", "train.recompute=full")],
        ),
        "pp2xdp2-accumulated": (4, ["--pp", 2, *ZERO3, *sets("parallel.reduce_every=2")]),
    }
    runs = {}
    for name, (ranks, flags) in cases.items():
        runs[name] = tmp_path / name
        assert_same_losses(reference, train_run(data_dir, runs[name], ranks, *flags), name)
        log = (runs[name] / "logs" / "rank-0.log").read_text()
        assert "fully sharded: " in log and "distributed optimizer" in log, name
    full = losses(runs["dp2"])
    parts = sorted(p.name for p in (runs["dp2"] / "checkpoints" / "step-00000010").glob("*.safetensors"))
    assert parts == [
        "shard-pp0-tp0-dp0.safetensors",
        "shard-pp0-tp0-dp1.safetensors",
        "shard-pp0-tp0.safetensors",
    ]

    same = resume(runs["dp2"], "same", tmp_path / "same", 2, *ZERO3)
    assert same == {step: full[step] for step in same}  # bitwise
    resumed = {
        "zero3-as-one-process": resume(
            runs["dp2"], "one", tmp_path / "as-one", None, *sets("parallel.zero=0")
        ),
        "zero3-tp2-as-pp2": resume(
            runs["tp2xdp2-sp-full"],
            "pp2",
            tmp_path / "as-pp2",
            4,
            "--tp",
            1,
            "--pp",
            2,
            *ZERO3,
            *sets("parallel.sequence_parallel=false"),
        ),
        "zero0-as-zero3": resume(tmp_path / "one", "z3", tmp_path / "as-z3", 2, *ZERO3),
        # zero 3 into zero 3 at another dp: each rank reads only its elements of the 4 part files
        "zero3-dp4-as-dp2": resume(runs["dp4"], "dp2", tmp_path / "as-dp2", 2, *ZERO3),
    }
    for name, got in resumed.items():
        for step, value in got.items():
            assert abs(value - reference[step]) <= 1e-3 * reference[step], (name, step)
    # The weights alone (no optimizer) are joined from the DP ranks' part files.
    proc = run_hpcllm(["generate", "--run", runs["dp2"], "--prompt", "def", "--max-new-tokens", 4])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_only_the_units_in_use_are_whole(data_dir, tmp_path):
    """The memory contract, counted from the storage of each rank's parameters during the steps:
    the shares are 1/dp of the partition, and the most held whole at once is the embedding, the
    positions and the head (kept from their forward to their backward) plus two blocks (the one
    computing and the one prefetched), not the whole six-block model."""
    run = tmp_path / "six-blocks"
    train_run(data_dir, run, 2, *ZERO3, *sets("model.n_layer=6"), steps=3)
    for figures in json.loads((run / "memory.json").read_text())["fully_sharded"]:
        assert figures["parameter_share_bytes"] * 2 == figures["partition_bytes"]
        allowed = figures["kept_units_bytes"] + 2 * figures["largest_block_bytes"]
        assert 0 < figures["peak_whole_parameter_bytes"] <= allowed
        assert allowed < 0.6 * figures["partition_bytes"]


def test_hybrid_sharding_groups_and_the_node_maps_it_refuses():
    """parallel.shard_group=node: shard groups are a DP group's ranks on one node, replica groups
    the ranks at the same place on each node; nodes holding different numbers of a DP group's
    ranks, or one each, are one line. (The training itself runs on two virtual nodes in
    test_multinode.py.)"""
    two_nodes = [0, 0, 1, 1]
    assert Layout.for_world(4).hybrid_dp_groups(two_nodes) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    # tp 2 inside each node: every DP group has one rank per node, so nothing to shard.
    assert Layout.for_world(4, tp=2).hybrid_dp_groups(two_nodes) == ([[0], [2], [1], [3]], [[0, 2], [1, 3]])
    with pytest.raises(UsageError, match="one of them: nothing to shard"):
        check_hybrid_sharding(Layout.for_world(4, tp=2), two_nodes)
    with pytest.raises(UsageError, match=r"has \[3, 1\] ranks on its nodes"):
        check_hybrid_sharding(Layout.for_world(4), [0, 0, 0, 1])
    check_hybrid_sharding(Layout.for_world(8), [0] * 4 + [1] * 4)
