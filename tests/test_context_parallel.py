"""Context parallelism (parallel.cp): ring attention against attention over the whole sequence on
one rank (the output and the gradients of the queries, keys and values at the positions each rank
holds, for multi-head and grouped-query attention, on 2 and 4 ranks), and training at cp 2 and 4,
alone and with dp, zero, recomputation, tp and pp, against one process."""

from itertools import product

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_same_losses, assert_usage_error, copy_run_at, losses, run_hpcllm, sets
from test_memory import train_run

from hpcllm.batch import attention_mask
from hpcllm.parallel import torch_dist
from hpcllm.parallel.context import block_attention as blocks
from hpcllm.parallel.context.ring_attention import held_positions, ring_attention
from hpcllm.parallel.context.transport import MpiRing, TorchRing


def test_each_rank_holds_two_chunks_that_balance_the_causal_work():
    assert held_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert held_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # Every position once, and the same number of (query, visible key) pairs on every rank.
    held = [held_positions(64, 4, r) for r in range(4)]
    assert sorted(torch.cat(held).tolist()) == list(range(64))
    assert len({int((p + 1).sum()) for p in held}) == 1


def check_ring_attention(comm):
    """Both transports: mpi4py, and torch.distributed (gloo here, NCCL on GPUs)."""
    torch_dist.init(comm, "cpu", timeout_s=60)
    group = torch.distributed.new_group(list(range(comm.Get_size())))
    for ring in (MpiRing(comm), TorchRing(group, list(range(comm.Get_size())), comm.Get_rank())):
        check_ring_attention_on(ring, comm)
    torch_dist.stop()


def check_ring_attention_on(ring, comm):
    cp, rank = comm.Get_size(), comm.Get_rank()
    sequence, batch, dim = 8 * cp, 2, 8
    # Documents packed in the rows, their boundaries falling inside and across the chunks.
    packed = torch.tensor(
        [[0] * 5 + [1] * (sequence - 12) + [2] * 7, [0] * (sequence // 2 + 1) + [1] * (sequence // 2 - 1)]
    )
    for (heads, kv_heads), documents in product(((4, 4), (4, 2)), (None, packed)):
        generator = torch.Generator().manual_seed(heads + kv_heads)
        q = torch.randn(batch, heads, sequence, dim, generator=generator, requires_grad=True)
        k = torch.randn(batch, kv_heads, sequence, dim, generator=generator, requires_grad=True)
        v = torch.randn(batch, kv_heads, sequence, dim, generator=generator, requires_grad=True)
        upstream = torch.randn(batch, heads, sequence, dim, generator=generator)
        repeat = heads // kv_heads
        mask = None if documents is None else attention_mask(documents)
        whole = F.scaled_dot_product_attention(
            q,
            k.repeat_interleave(repeat, 1),
            v.repeat_interleave(repeat, 1),
            attn_mask=mask,
            is_causal=mask is None,
        )
        whole.backward(upstream)
        mine = held_positions(sequence, cp, rank)
        parts = [t.detach()[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
        held_documents = None if documents is None else documents[:, mine].contiguous()
        out = ring_attention(*parts, mine, ring, documents=held_documents)
        out.backward(upstream[:, :, mine])
        torch.testing.assert_close(out, whole.detach()[:, :, mine], rtol=1e-5, atol=1e-5)
        for part, full in zip(parts, (q, k, v), strict=True):
            torch.testing.assert_close(part.grad, full.grad[:, :, mine], rtol=1e-4, atol=1e-5)


@pytest.mark.mpi(ranks=2, timeout=120)
def test_ring_attention_on_two_ranks_is_attention_over_the_whole_sequence(comm):
    check_ring_attention(comm)


@pytest.mark.mpi(ranks=4, timeout=120)
def test_ring_attention_on_four_ranks_is_attention_over_the_whole_sequence(comm):
    check_ring_attention(comm)


def test_context_parallel_layouts_match_one_process_and_checkpoints_move_between_cp(data_dir, tmp_path):
    """cp 2 and cp 4; cp 2 with dp 2 at zero=3 and full recomputation, with tp 2 and sequence
    parallelism (the ring on torch.distributed: gloo here, NCCL on GPUs), with pp 2 at
    zero=1, with documents packed in the rows (data.document_mask): the single-process losses. A
    cp 2 checkpoint (of the run with documents) resumes in one process, a one-process checkpoint
    at cp 2 (checkpoints do not depend on cp)."""
    every = sets("train.ckpt_every=10")
    reference = train_run(data_dir, tmp_path / "one", None, *every)
    cases = {
        "cp4": (4, ["--cp", 4]),
        "cp2xdp2-zero3-full": (4, ["--cp", 2, *sets("parallel.zero=3", "train.recompute=full")]),
        "cp2xtp2-sp-torch-ring": (
            4,
            ["--cp", 2, "--tp", 2, *sets("parallel.cp_backend=torch", "parallel.sequence_parallel=true")],
        ),
        "cp2xpp2-zero1": (4, ["--cp", 2, "--pp", 2, *sets("parallel.zero=1")]),
    }
    documents = sets("data.document_mask=true")  # documents packed in rows, each attending to itself
    cases_with_documents = {"cp2-documents": (2, ["--cp", 2, *documents, *every])}
    for name, (ranks, flags) in cases.items():
        assert_same_losses(reference, train_run(data_dir, tmp_path / name, ranks, *flags), name)
    with_documents = train_run(data_dir, tmp_path / "one-documents", None, *documents, *every)
    for name, (ranks, flags) in cases_with_documents.items():
        assert_same_losses(with_documents, train_run(data_dir, tmp_path / name, ranks, *flags), name)
    assert "pp=1 x dp=1 x cp=2 x tp=1" in (tmp_path / "cp2-documents" / "logs" / "rank-0.log").read_text()
    torch_ring_log = (tmp_path / "cp2xtp2-sp-torch-ring" / "logs" / "rank-0.log").read_text()
    assert "context parallel torch (gloo)" in torch_ring_log
    for name, run, ranks, flags, expected in (
        ("cp2-as-one", tmp_path / "cp2-documents", None, ["--cp", 1], with_documents),
        ("one-as-cp2", tmp_path / "one", 2, ["--cp", 2], reference),
    ):
        copy = copy_run_at(run, "step-00000010", tmp_path / name)
        proc = run_hpcllm(["train", "--out", copy, "--resume", *flags], ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for step, value in losses(copy).items():
            assert abs(value - expected[step]) <= 1e-3 * expected[step], (name, step)


def test_what_context_parallelism_does_not_support_is_one_line(data_dir, tmp_path):
    for ranks, flags, needle in (
        (3, ["--cp", 3], "does not divide by 6"),
        (2, ["--cp", 2, *sets("model.dropout=0.1")], "does not support model.dropout=0.1"),
    ):
        proc = run_hpcllm(["train", "--data", data_dir, "--out", tmp_path / "r", *TINY, *flags], ranks=ranks)
        assert_usage_error(proc, needle)
        assert not (tmp_path / "r").exists()


def test_a_block_fused_and_written_out_agree_including_queries_that_see_nothing():
    """The ring's unit on CPU is PyTorch's fused flash kernel; other devices use the written-out
    arithmetic. Both are checked here, on CPU, against each other and against plain softmax
    attention, for a block where some queries see no key (their output 0, log-sum-exp -inf)."""
    generator = torch.Generator().manual_seed(3)
    q, k, v, upstream = (torch.randn(2, 4, 6, 8, generator=generator) for _ in range(4))
    at_q = (torch.arange(6), torch.tensor([[0] * 6, [0, 0, 1, 1, 1, 1]]))
    at_k = (torch.arange(6) + 2, torch.tensor([[0] * 6, [0] * 6]))
    mask = blocks.BlockMask.of(at_q, at_k)
    assert not mask.empty and mask.unseen_rows is not None and bool(mask.unseen_rows[..., :2].all())
    assert blocks.BlockMask.of((torch.arange(4),), (torch.arange(4) + 4,)).empty
    results = [blocks.forward(q, k, v, mask, fused=fused) for fused in (True, False)]
    for out, lse in results:
        assert torch.isinf(lse[..., :2]).all() and (out[..., :2, :] == 0).all()
    scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(mask.hidden, float("-inf"))
    seen = ~mask.unseen_rows.expand(lse.shape)
    expected = torch.nan_to_num(scores.softmax(-1)) @ v
    for out, lse in results:
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(lse[seen], scores.logsumexp(-1)[seen])
    # Backward against the merged statistics of a second, fully visible block.
    out, lse = results[0]
    causal = blocks.BlockMask.of((torch.arange(6),), (torch.arange(6),))  # same positions: the kernel's flag
    assert causal.causal and causal.hidden is None
    (other_out, other_lse), written_out = (blocks.forward(q, v, k, causal, fused=f) for f in (True, False))
    torch.testing.assert_close(other_out, written_out[0])
    merged = torch.logaddexp(lse, other_lse)
    total = out * (lse - merged).exp()[..., None] + other_out * (other_lse - merged).exp()[..., None]
    fused, written = (blocks.backward(upstream, q, k, v, total, merged, mask, fused=f) for f in (True, False))
    for a, b in zip(fused, written, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    fused, written = (
        blocks.backward(upstream, q, v, k, total, merged, causal, fused=f) for f in (True, False)
    )
    for a, b in zip(fused, written, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
