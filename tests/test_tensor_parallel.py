"""Tensor parallelism: the communication operators, the partitioned layers and the partitioned
GPT against their single-process selves, TP training equivalence, and resharding checkpoints."""

import json
import shutil

import pytest
from conftest import TINY, losses, run_hpcllm

# n_head divisible by 4; the byte vocabulary (257) divides by neither 2 nor 4: padding is exercised.
TP_MODEL = [*TINY, "--set", "model.n_head=4"]


def _group(comm):
    from hpcllm.parallel.tensor.collectives import TensorCollectives

    return TensorCollectives(comm)


@pytest.mark.mpi(ranks=2, timeout=120)
def test_operators_forward_and_backward(comm):
    import torch

    from hpcllm.parallel.tensor.mappings import (
        copy_to_region,
        gather_from_region,
        reduce_from_region,
        scatter_to_region,
    )

    group, rank = _group(comm), comm.Get_rank()
    weights = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])]

    x = torch.ones(4, requires_grad=True)  # copy: identity forward, summed gradient backward
    y = copy_to_region(x, group)
    assert torch.equal(y, x)
    (y * weights[rank]).sum().backward()
    assert torch.equal(x.grad, weights[0] + weights[1])

    x = weights[rank].clone().requires_grad_()  # reduce: summed forward, identity backward
    y = reduce_from_region(x * 1.0, group)
    assert torch.equal(y, weights[0] + weights[1])
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((4,), 2.0))

    full = torch.arange(8.0).reshape(2, 4).requires_grad_()  # scatter: my half; gathered gradient
    y = scatter_to_region(full, group)
    assert torch.equal(y, full.detach()[:, rank * 2 : rank * 2 + 2])
    (y * (rank + 1)).sum().backward()
    assert torch.equal(full.grad, torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]))

    x = torch.full((2, 2), float(rank)).requires_grad_()  # gather: concatenated; my slice back
    y = gather_from_region(x, group)
    assert torch.equal(y, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]))
    weights_2d = torch.arange(8.0).reshape(2, 4)
    (y * weights_2d).sum().backward()
    assert torch.equal(x.grad, weights_2d[:, rank * 2 : rank * 2 + 2])


@pytest.mark.mpi(ranks=2, timeout=120)
def test_column_and_row_parallel_linear_match_the_full_layer(comm):
    import torch

    from hpcllm.parallel.sharding import Sharding, shard
    from hpcllm.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear

    group, rank = _group(comm), comm.Get_rank()
    torch.manual_seed(0)
    full = torch.nn.Linear(6, 8)
    x = torch.randn(3, 6)
    upstream = torch.randn(3, 8)

    x_full = x.clone().requires_grad_()
    (full(x_full) * upstream).sum().backward()

    rows, cols = Sharding(dim=0), Sharding(dim=1)
    col = ColumnParallelLinear.from_full(full, group)
    x_col = x.clone().requires_grad_()
    out = col(x_col)
    assert torch.allclose(out, full(x).detach()[:, rank * 4 : rank * 4 + 4], atol=1e-6)
    (out * upstream[:, rank * 4 : rank * 4 + 4]).sum().backward()
    assert torch.allclose(col.weight.grad, shard(full.weight.grad, rows, rank, 2), atol=1e-6)
    assert torch.allclose(col.bias.grad, shard(full.bias.grad, rows, rank, 2), atol=1e-6)
    assert torch.allclose(x_col.grad, x_full.grad, atol=1e-6)  # summed over the group

    row_full = torch.nn.Linear(8, 6)
    h = torch.randn(3, 8)
    up = torch.randn(3, 6)
    h_full = h.clone().requires_grad_()
    (row_full(h_full) * up).sum().backward()
    row = RowParallelLinear.from_full(row_full, group)
    h_part = h[:, rank * 4 : rank * 4 + 4].clone().requires_grad_()
    out = row(h_part)
    assert torch.allclose(out, row_full(h).detach(), atol=1e-6)
    (out * up).sum().backward()
    assert torch.allclose(row.weight.grad, shard(row_full.weight.grad, cols, rank, 2), atol=1e-6)
    assert torch.allclose(row.bias.grad, row_full.bias.grad, atol=1e-6)
    assert torch.allclose(h_part.grad, h_full.grad[:, rank * 4 : rank * 4 + 4], atol=1e-6)


@pytest.mark.mpi(ranks=2, timeout=120)
def test_vocab_parallel_cross_entropy_matches_full_with_padding(comm):
    import torch
    import torch.nn.functional as F

    from hpcllm.parallel.sharding import Sharding, padded_size, shard
    from hpcllm.parallel.tensor.layers import VocabParallelHead

    group, rank = _group(comm), comm.Get_rank()
    vocab = 11  # padded to 12 at tp = 2
    torch.manual_seed(1)
    logits = torch.randn(5, vocab)
    targets = torch.tensor([0, 5, 6, 10, 3])
    full = logits.clone().requires_grad_()
    expected = F.cross_entropy(full, targets)
    expected.backward()

    # This rank's vocabulary columns of every row (shard cuts rows, so cut the transpose).
    by_vocab = Sharding(dim=0, full_size=vocab)
    local = shard(logits.T.contiguous(), by_vocab, rank, 2).T.contiguous().requires_grad_()
    head = VocabParallelHead(group, start=rank * padded_size(vocab, 2) // 2, vocab_size=vocab)
    loss = head.loss_sum(local, targets) / len(targets)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    expected_grad = shard(full.grad.T.contiguous(), by_vocab, rank, 2).T
    assert torch.allclose(local.grad, expected_grad, atol=1e-6)

    # A loss mask (the ignore index): those targets add nothing to the sum or to the gradient.
    from hpcllm.batch import IGNORE

    masked = targets.clone()
    masked[[1, 3]] = IGNORE
    full.grad, local.grad = None, None
    expected = F.cross_entropy(full, masked, ignore_index=IGNORE, reduction="sum")
    expected.backward()
    loss = head.loss_sum(local, masked)
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    expected_grad = shard(full.grad.T.contiguous(), by_vocab, rank, 2).T
    assert torch.allclose(local.grad, expected_grad, atol=1e-6)
    assert float(local.grad[[1, 3]].abs().sum()) == 0.0


@pytest.mark.mpi(ranks=2, timeout=120)
def test_partitioned_gpt_matches_the_full_model_gradient_by_gradient(comm):
    import torch

    from hpcllm.model.gpt import GPT, GPTShape
    from hpcllm.model.partition import partition_tensor_parallel
    from hpcllm.parallel.sharding import model_sharding, unshard
    from hpcllm.parallel.tensor.collectives import TensorCollectives

    shape = GPTShape(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_embd=16)
    torch.manual_seed(3)
    full = GPT(shape)
    torch.manual_seed(3)
    part = partition_tensor_parallel(GPT(shape), TensorCollectives(comm))
    idx = torch.randint(0, 13, (3, 8))
    full_loss = full.loss(full(idx), idx)
    full_loss.backward()
    part_loss = part.loss(part(idx), idx)
    assert abs(part_loss.item() - full_loss.item()) < 1e-5
    part_loss.backward()
    grads = dict(part.named_parameters())
    sharding = model_sharding(part)
    for name, p in full.named_parameters():
        slices = comm.allgather(grads[name].grad)
        rebuilt = unshard(slices, sharding[name])
        assert torch.allclose(rebuilt, p.grad, atol=1e-5), name
        if not sharding[name].partitioned:  # LayerNorms and friends stay identical on every TP rank
            assert all(torch.equal(s, slices[0]) for s in slices), name


def test_train_tp2_tp4_and_dp2xtp2_match_tp1(data_dir, tmp_path):
    base = tmp_path / "tp1"
    proc = run_hpcllm(["train", "--data", data_dir, "--out", base, *TP_MODEL, "--steps", 20])
    assert proc.returncode == 0, proc.stderr
    reference = losses(base)
    for name, ranks, tp in (("tp2", 2, 2), ("tp4", 4, 4), ("dp2tp2", 4, 2)):
        out = tmp_path / name
        proc = run_hpcllm(
            ["train", "--data", data_dir, "--out", out, *TP_MODEL, "--steps", 20, "--tp", tp], ranks=ranks
        )
        assert proc.returncode == 0, proc.stderr
        got = losses(out)
        assert abs(got[1] - reference[1]) <= 1e-5 * reference[1], name
        for step, value in reference.items():
            assert abs(got[step] - value) <= 1e-3 * value, (name, step)
        log = (out / "logs" / "rank-0.log").read_text()
        assert f"vocabulary padded from 257 to {258 if tp == 2 else 260}" in log
        assert "MB on this rank" in log and "in the full model" in log


def test_checkpoint_saved_at_tp2_resumes_at_tp1_and_tp4(data_dir, tmp_path):
    full = tmp_path / "tp2"
    proc = run_hpcllm(
        [
            "train",
            "--data",
            data_dir,
            "--out",
            full,
            *TP_MODEL,
            "--steps",
            12,
            "--tp",
            2,
            "--set",
            "train.ckpt_every=6",
            "--set",
            "train.keep=5",
        ],
        ranks=2,
    )
    assert proc.returncode == 0, proc.stderr
    reference = losses(full)
    for tp in (1, 4):
        crashed = tmp_path / f"resume-tp{tp}"
        shutil.copytree(full, crashed)
        shutil.rmtree(crashed / "checkpoints" / "step-00000012")
        (crashed / "checkpoints" / "latest").write_text("step-00000006\n")
        proc = run_hpcllm(["train", "--out", crashed, "--resume", "--tp", tp], ranks=tp if tp > 1 else None)
        assert proc.returncode == 0, proc.stderr
        got = losses(crashed)
        for step in range(7, 13):
            assert abs(got[step] - reference[step]) <= 1e-3 * reference[step], (tp, step)
        manifest = json.loads((crashed / "checkpoints" / "step-00000012" / "manifest.json").read_text())
        assert manifest["layout"]["tp"] == tp


def test_heads_not_divisible_by_tp_is_refused(data_dir, tmp_path):
    proc = run_hpcllm(["train", "--data", data_dir, "--out", tmp_path / "r", *TINY, "--tp", 4], ranks=4)
    assert proc.returncode == 2
    assert "model.n_head 2 is not divisible by tp 4" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.mpi(ranks=2, timeout=120)
def test_a_layer_named_against_the_old_convention_reshards_by_its_declaration(comm, mpi_tmp_path):
    """`q_proj` ends in proj.weight, which the old name rule read as row-parallel; it is a
    column-parallel layer and says so. Saved at tp = 2, it loads at tp = 1 (dp = 2) whole."""
    import torch

    from hpcllm.parallel.grid import Grid
    from hpcllm.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear
    from hpcllm.training import checkpoint

    def layers(q_proj, out_fc):
        return torch.nn.ModuleDict({"q_proj": q_proj, "out_fc": out_fc})

    torch.manual_seed(0)
    full = layers(torch.nn.Linear(4, 6), torch.nn.Linear(6, 4))
    group = _group(comm)
    model = layers(
        ColumnParallelLinear.from_full(full["q_proj"], group),
        RowParallelLinear.from_full(full["out_fc"], group),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model["out_fc"](model["q_proj"](torch.randn(3, 4))).square().sum().backward()
    optimizer.step()  # every parameter moves; Adam's moments are sharded like their parameters
    saved = checkpoint.save(mpi_tmp_path, 1, model, optimizer, Grid(comm, tp=2), {}, keep=1)

    fresh = layers(torch.nn.Linear(4, 6), torch.nn.Linear(6, 4))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    checkpoint.load(saved, fresh, fresh_optimizer, Grid(comm, tp=1))
    joined = {  # the tp = 2 slices joined along each layer's declared dimension
        "q_proj.weight": torch.cat(comm.allgather(model["q_proj"].weight.detach()), dim=0),
        "q_proj.bias": torch.cat(comm.allgather(model["q_proj"].bias.detach()), dim=0),
        "out_fc.weight": torch.cat(comm.allgather(model["out_fc"].weight.detach()), dim=1),
        "out_fc.bias": model["out_fc"].bias.detach(),
    }
    for name, param in fresh.named_parameters():
        assert torch.equal(param.detach(), joined[name]), name
    moments = torch.cat(comm.allgather(optimizer.state[model["q_proj"].weight]["exp_avg"]), dim=0)
    assert torch.equal(fresh_optimizer.state[fresh["q_proj"].weight]["exp_avg"], moments)
