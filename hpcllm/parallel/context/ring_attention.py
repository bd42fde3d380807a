"""Ring attention for context parallelism: causal attention of this rank's part of the sequences
over every rank's keys and values, with the key/value blocks passed around the context-parallel
group and the softmax statistics combined exactly (Liu et al. 2023, "Ring Attention"; the load
balance of Megatron-Core's context parallelism).

- Which positions a rank holds (`held_positions`): the sequence is cut into 2·cp chunks and rank i
  holds chunks i and 2·cp−1−i, so that under the causal mask every rank does the same work.
- Forward: cp steps. At each, this rank's queries attend to the block in hand (its own first) under
  the causal rule of the positions (a key is seen by the queries at or after its position; with
  documents packed in a row, by those of its own document only: their ids travel with the block), and
  the block's output is merged into the running one with the running max and sum of exponentials
  (online softmax). The next block's transfer (a point-to-point send to the next rank, a receive
  from the previous) is started before the block in hand is computed, and waited for after.
- Backward: the blocks go around again, each with the gradients of its keys and values, which
  every rank adds its part to; after cp hops a block and its gradients are back with their owner.
  The probabilities are rebuilt from the saved log-sum-exp, as flash attention's backward does.
- A block is attended chunk by chunk (block_attention): a chunk of keys is wholly visible to a
  chunk of queries, or wholly hidden (skipped), or at the same positions (causal), so each piece
  is one call of PyTorch's fused flash-attention kernel on CPU without a mask (with documents, a
  mask), forward returning the log-sum-exp, backward taking the merged one.

The transfers go by `transport` (parallel.cp_backend: mpi4py, or torch.distributed). In fp32,
whatever the inputs' dtype (the results are cast back). Grouped-query attention: keys and values
may have fewer heads than the queries.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcllm.parallel.context import block_attention as blocks
from hpcllm.parallel.context.transport import MpiRing, TorchRing


def held_positions(sequence: int, cp: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """The positions of a sequence that context-parallel rank `rank` holds, in order: chunks `rank`
    and 2·cp−1−rank of 2·cp equal ones (the sequence must divide by 2·cp)."""
    size = sequence // (2 * cp)
    first, second = rank * size, (2 * cp - 1 - rank) * size
    return torch.cat([torch.arange(first, first + size), torch.arange(second, second + size)]).to(device)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        at: tuple[torch.Tensor, ...],
        ring: MpiRing | TorchRing,
    ) -> torch.Tensor:
        heads = q.shape[1]
        at = tuple(t.contiguous() for t in at)
        qf, block = q.float().contiguous(), [k.float().contiguous(), v.float().contiguous(), *at]
        out = torch.zeros_like(qf)
        lse = torch.full(qf.shape[:-1], float("-inf"), device=qf.device)
        for step in range(ring.size):
            pending = ring.start(block, tag=10 * step) if step < ring.size - 1 else None
            k_b, v_b = (blocks.expand_heads(x, heads) for x in block[:2])
            out, lse = blocks.attend(out, lse, qf, k_b, v_b, at, tuple(block[2:]))
            if pending is not None:
                ring.finish(pending[0])
                block = pending[1]
        ctx.save_for_backward(q, k, v, out, lse, *at)
        ctx.ring = ring
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, *at = ctx.saved_tensors
        ring, heads, kv_heads, where = ctx.ring, q.shape[1], k.shape[1], len(at)
        qf, g = q.float().contiguous(), grad.float().contiguous()
        grad_q = torch.zeros_like(qf)
        kf, vf = k.float().contiguous(), v.float().contiguous()
        block = [kf, vf, *at, torch.zeros_like(kf), torch.zeros_like(vf)]
        for step in range(ring.size):
            k_b, v_b, at_b = block[0], block[1], tuple(block[2 : 2 + where])
            grad_k, grad_v = block[2 + where :]
            wide_k, wide_v = blocks.expand_heads(k_b, heads), blocks.expand_heads(v_b, heads)
            grads = blocks.block_gradients(g, qf, wide_k, wide_v, out, lse, tuple(at), at_b)
            if grads is not None:
                dq, dk, dv = grads
                grad_q += dq
                grad_k = grad_k + blocks.fold_heads(dk, kv_heads)
                grad_v = grad_v + blocks.fold_heads(dv, kv_heads)
            # Every block moves on, its gradients with it: after cp hops it is home again.
            moving = [k_b, v_b, *at_b, grad_k.contiguous(), grad_v.contiguous()]
            requests, block = ring.start(moving, 100 + 10 * step)
            ring.finish(requests)
        grad_k, grad_v = block[-2], block[-1]
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    ring: MpiRing | TorchRing | Any,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q [batch, heads, time, head_dim] (this rank's `positions` of the
    sequences) over the keys and values [batch, kv_heads, time, head_dim] of every rank of the
    ring (a transport, or an mpi4py communicator; each rank holding its own positions:
    `held_positions`); with `documents` [batch, time] (each held token's document in its row), a
    query sees only its own document's keys. Returns [batch, heads, time, head_dim]."""
    ring = ring if isinstance(ring, MpiRing | TorchRing) else MpiRing(ring)
    if ring.size == 1:
        raise ValueError("ring attention needs a context-parallel group of two or more ranks")
    at = (positions,) if documents is None else (positions, documents)
    return _RingAttention.apply(q, k, v, at, ring)
