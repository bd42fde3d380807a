"""Context parallelism's ring attention against attention over the whole sequence on one rank: the
output and the gradients of the queries, keys and values at the positions each rank holds, for
multi-head and grouped-query attention, on 2 and 4 ranks."""

import pytest
import torch
import torch.nn.functional as F

from hpcllm.parallel.context.ring_attention import held_positions, ring_attention


def test_each_rank_holds_two_chunks_that_balance_the_causal_work():
    assert held_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert held_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # Every position once, and the same number of (query, visible key) pairs on every rank.
    held = [held_positions(64, 4, r) for r in range(4)]
    assert sorted(torch.cat(held).tolist()) == list(range(64))
    assert len({int((p + 1).sum()) for p in held}) == 1


def check_ring_attention(comm):
    cp, rank = comm.Get_size(), comm.Get_rank()
    for heads, kv_heads in ((4, 4), (4, 2)):
        generator = torch.Generator().manual_seed(heads + kv_heads)
        sequence, batch, dim = 8 * cp, 2, 8
        q = torch.randn(batch, heads, sequence, dim, generator=generator, requires_grad=True)
        k = torch.randn(batch, kv_heads, sequence, dim, generator=generator, requires_grad=True)
        v = torch.randn(batch, kv_heads, sequence, dim, generator=generator, requires_grad=True)
        upstream = torch.randn(batch, heads, sequence, dim, generator=generator)
        repeat = heads // kv_heads
        whole = F.scaled_dot_product_attention(
            q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), is_causal=True
        )
        whole.backward(upstream)
        mine = held_positions(sequence, cp, rank)
        parts = [t.detach()[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
        out = ring_attention(*parts, mine, comm)
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
