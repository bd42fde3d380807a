"""Dropout under every layout: the masks are keyed by (seed, site, sample, element), so each layout
drops exactly what one process drops (the equivalence oracle holds with dropout), and a resumed
run continues bitwise."""

import torch
from conftest import TINY, assert_same_losses, copy_run_at, losses, run_hpcllm, sets

from hpcllm.model.dropout import DropoutKeys, keyed_dropout

DROPOUT = sets("model.dropout=0.1", "train.ckpt_every=5", "train.eval_every=0")


def run(data_dir, out, ranks, *flags, steps=10):
    command = ["train", "--data", data_dir, "--out", out, *TINY, *DROPOUT, "--steps", steps]
    proc = run_hpcllm([*command, *flags], ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(out)


def test_keyed_masks_drop_p_independently_of_the_batch_they_run_in():
    x = torch.ones(4, 64, 32)
    keys = DropoutKeys(seed=7, samples=torch.arange(10, 14))
    dropped = keyed_dropout(x, 0.25, keys, site=3, strides=(32, 1))
    assert abs(float((dropped == 0).float().mean()) - 0.25) < 0.02
    assert torch.allclose(dropped[dropped != 0], torch.tensor(1 / 0.75))
    # A sample's mask does not depend on its neighbours in the batch, or on the batch's size.
    alone = keyed_dropout(x[2:3], 0.25, DropoutKeys(seed=7, samples=torch.tensor([12])), 3, (32, 1))
    assert torch.equal(alone[0], dropped[2])
    # Another site, sample or seed draws another mask; half of a row's features at an offset are
    # the same elements as in the whole row.
    assert not torch.equal(keyed_dropout(x, 0.25, keys, 4, (32, 1)), dropped)
    assert not torch.equal(keyed_dropout(x, 0.25, DropoutKeys(8, keys.samples), 3, (32, 1)), dropped)
    second_half = keyed_dropout(x[:, 32:], 0.25, keys, 3, (32, 1), offset=32 * 32)
    assert torch.equal(second_half, dropped[:, 32:])


def test_dropout_is_layout_independent_and_resumes_bitwise(data_dir, tmp_path):
    """With model.dropout = 0.1: one process (measuring its matmul peak, which draws from torch's
    generator), dp 2 at micro-batch 1, and pp 2 x tp 2 with sequence parallelism and full
    recomputation give the same losses; the one-process run and the tp 2 + SP run each resumed
    at step 5 repeat their own steps 6-10 bitwise."""
    one = run(data_dir, tmp_path / "one", None, *sets("train.peak_flops=0"))
    assert one[1] != run(data_dir, tmp_path / "no-dropout", None, "--steps", 1, *sets("model.dropout=0"))[1]
    assert_same_losses(one, run(data_dir, tmp_path / "dp2", 2, *sets("train.micro_batch=1")), "dp2")
    tp_sp = ["--tp", 2, *sets("parallel.sequence_parallel=true")]
    layout = [*tp_sp, "--pp", 2, *sets("train.recompute=full")]
    assert_same_losses(one, run(data_dir, tmp_path / "pp2tp2", 4, *layout), "pp2 x tp2, SP, full recompute")
    tp2 = run(data_dir, tmp_path / "tp2", 2, *tp_sp)
    assert_same_losses(one, tp2, "tp2, SP")
    for name, ranks, full in (("one", None, one), ("tp2", 2, tp2)):
        copy = copy_run_at(tmp_path / name, "step-00000005", tmp_path / f"{name}-resumed")
        proc = run_hpcllm(["train", "--out", copy, "--resume"], ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
        resumed = losses(copy)
        assert sorted(resumed) == list(range(6, 11)), name
        assert all(resumed[step] == full[step] for step in resumed), (name, resumed, full)
