"""Attention of a block of queries over a block of keys, returning the log-sum-exp of each query's
scores: the unit the ring merges (forward) and differentiates against the merged statistics
(backward), as flash attention does across its tiles.

On CPU both directions are PyTorch's fused flash-attention kernels (`aten._scaled_dot_product_flash
_attention_for_cpu` and its backward), which never write a block's scores out; elsewhere the same
arithmetic is written out in fp32. A key hidden from a query (a later position, another document)
is masked with -inf; a block hiding every key from every query is skipped by the caller
(`BlockMask.empty`), one hiding nothing needs no mask at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class BlockMask:
    """Which keys of a block each query may not see: `hidden` [tq, tk], or [b, 1, tq, tk] with
    documents; None when every query sees every key, or when the block is `causal` (queries and
    keys at the same positions: the kernel's own causal rule, which skips the hidden tiles)."""

    hidden: torch.Tensor | None
    empty: bool = False  # no query sees any key: the block contributes nothing
    unseen_rows: torch.Tensor | None = None  # queries that see no key of the block ([..., tq] bool)
    causal: bool = False

    @classmethod
    def of(cls, q_at: tuple[torch.Tensor, ...], k_at: tuple[torch.Tensor, ...]) -> BlockMask:
        """`*_at` = (positions,) or (positions, documents [b, t]): the causal rule of the
        positions, and with documents, a key seen only by its own document's queries."""
        if len(q_at) == 1 and q_at[0].shape == k_at[0].shape and torch.equal(q_at[0], k_at[0]):
            return cls(None, causal=True)
        hidden = k_at[0][None, :] > q_at[0][:, None]
        if len(q_at) > 1:
            hidden = hidden | (q_at[1][:, None, :, None] != k_at[1][:, None, None, :])
        if not bool(hidden.any()):
            return cls(None)
        unseen = hidden.all(dim=-1)
        if bool(unseen.all()):
            return cls(hidden, empty=True)
        return cls(hidden, unseen_rows=unseen if bool(unseen.any()) else None)

    @classmethod
    def of_runs(cls, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
        """Positions in contiguous ascending runs, no documents: decided from the runs' ends, so
        that no [tq, tk] mask is built for a piece wholly visible, hidden or causal."""
        q_first, q_last, k_first, k_last = int(q[0]), int(q[-1]), int(k[0]), int(k[-1])
        if k_first > q_last:
            return cls(None, empty=True)
        if k_last <= q_first:
            return cls(None)
        if (q_first, q_last) == (k_first, k_last):
            return cls(None, causal=True)
        return cls.of((q,), (k,))  # runs that partly overlap: the general rule

    def additive(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask the fused kernel adds to the scores (not for a causal block: the kernel's flag
        is): [1 or b, 1, tq, tk], -inf where hidden."""
        if self.hidden is None:
            return None
        hidden = self.hidden if self.hidden.dim() == 4 else self.hidden[None, None]
        return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill(hidden, float("-inf"))


def runs(positions: torch.Tensor) -> list[slice]:
    """The contiguous ascending runs of `positions` (a context-parallel rank's chunks)."""
    breaks = ((positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1).tolist()
    edges = [0, *breaks, len(positions)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _part(at: tuple[torch.Tensor, ...], where: slice) -> tuple[torch.Tensor, ...]:
    return (at[0][where], *(documents[:, where] for documents in at[1:]))


def _pieces(
    q_at: tuple[torch.Tensor, ...], k_at: tuple[torch.Tensor, ...]
) -> Iterator[tuple[slice, slice, BlockMask]]:
    """(query run, key run, mask) of every piece of a block in which some query sees some key."""
    k_runs = runs(k_at[0])
    for q_run in runs(q_at[0]):
        for k_run in k_runs:
            if len(q_at) == 1:
                mask = BlockMask.of_runs(q_at[0][q_run], k_at[0][k_run])
            else:
                mask = BlockMask.of(_part(q_at, q_run), _part(k_at, k_run))
            if not mask.empty:
                yield q_run, k_run, mask


def attend(
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_at: tuple[torch.Tensor, ...],
    k_at: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the attention of q over a block (k, v expanded to q's heads, at positions `k_at`)
    into the running output and log-sum-exp (online softmax), run of positions by run of
    positions, so that each piece is wholly visible, causal, hidden, or (documents) masked."""
    for q_run, k_run, mask in _pieces(q_at, k_at):
        piece_out, piece_lse = forward(q[:, :, q_run], k[:, :, k_run], v[:, :, k_run], mask)
        before, before_lse = out[:, :, q_run], lse[:, :, q_run]
        merged = torch.logaddexp(before_lse, piece_lse)
        safe = merged.masked_fill(merged == float("-inf"), 0.0)  # rows that saw no key yet
        kept, added = (before_lse - safe).exp(), (piece_lse - safe).exp()
        out[:, :, q_run] = before * kept[..., None] + piece_out * added[..., None]
        lse[:, :, q_run] = merged
    return out, lse


def block_gradients(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_at: tuple[torch.Tensor, ...],
    k_at: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The block's share of the gradients of q, k, v (k, v expanded), piece by piece as `attend`
    cut it; None when no query sees any of its keys."""
    grads = None
    for q_run, k_run, mask in _pieces(q_at, k_at):
        if grads is None:
            grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
        pieces = (grad[:, :, q_run], q[:, :, q_run], k[:, :, k_run], v[:, :, k_run])
        dq, dk, dv = backward(*pieces, out[:, :, q_run], lse[:, :, q_run], mask)
        grads[0][:, :, q_run] += dq
        grads[1][:, :, k_run] += dk
        grads[2][:, :, k_run] += dv
    return grads


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: each key/value head serves heads / kv_heads query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def fold_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A gradient over the expanded heads, summed back onto the key/value heads."""
    if x.shape[1] == kv_heads:
        return x
    return x.unflatten(1, (kv_heads, x.shape[1] // kv_heads)).sum(dim=2)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, fused: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [b, h, tq, d], log-sum-exp [b, h, tq]) of fp32 q over the block's k, v (already
    expanded to q's heads); a query that sees no key gets output 0 and log-sum-exp -inf. `fused`:
    the CPU kernel (default on CPU)."""
    if q.device.type == "cpu" if fused is None else fused:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask.causal, attn_mask=mask.additive(q.dtype)
        )
    else:
        scores = _scores(q, k, mask)
        lse = scores.logsumexp(dim=-1)
        safe = lse.masked_fill(lse == float("-inf"), 0.0)
        out = (scores - safe[..., None]).exp() @ v
    if mask.unseen_rows is not None:  # the kernel reports 0 there; nothing was seen
        unseen = mask.unseen_rows.expand(lse.shape)
        lse = lse.masked_fill(unseen, float("-inf"))
        out = out.masked_fill(unseen[..., None], 0.0)
    return out, lse


def backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: BlockMask,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's share of the gradients of q, k, v (k, v expanded) given the merged output `out`
    and log-sum-exp `lse` of every block: the probabilities are exp(scores − lse)."""
    if q.device.type == "cpu" if fused is None else fused:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, mask.causal, attn_mask=mask.additive(q.dtype)
        )
        return grads[0], grads[1], grads[2]
    probs = (_scores(q, k, mask) - lse[..., None]).exp()
    delta = (grad * out).sum(dim=-1, keepdim=True)
    grad_scores = probs * (grad @ v.transpose(-1, -2) - delta) / math.sqrt(q.shape[-1])
    return grad_scores @ k, grad_scores.transpose(-1, -2) @ q, probs.transpose(-1, -2) @ grad


def _scores(q: torch.Tensor, k: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask.causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill(hidden, float("-inf"))
    additive = mask.additive(q.dtype)
    return scores if additive is None else scores + additive
