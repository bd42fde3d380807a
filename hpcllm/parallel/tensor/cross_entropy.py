"""Cross-entropy over logits split by vocabulary across the TP group, never gathering them: the max,
the target's logit and the sum of exponentials are reduced over the group (Megatron's algorithm).
Padded vocabulary ids (beyond the real vocabulary) are masked out. And the same loss with the head's
matmul, chunk by chunk, for train.loss_chunk (`chunked_linear_cross_entropy`)."""

from __future__ import annotations

from typing import Any

import torch

from hpcllm.batch import IGNORE
from hpcllm.parallel.tensor.collectives import TensorCollectives


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward reduces three statistics over the group; backward needs no communication."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        group: TensorCollectives,
        start: int,
        vocab_size: int,
    ) -> torch.Tensor:
        local = logits.float()
        width = local.shape[-1]
        padding = torch.arange(start, start + width, device=local.device) >= vocab_size
        local = local.masked_fill(padding, float("-inf"))  # padded ids are not words
        shifted = local - group.allreduce_(local.max(dim=-1).values.contiguous(), op="max").unsqueeze(-1)
        outside = (targets < start) | (targets >= start + width)
        local_targets = (targets - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target_logit = group.allreduce_(target_logit.contiguous())
        exp = shifted.exp()
        sum_exp = group.allreduce_(exp.sum(dim=-1).contiguous())
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local_targets, outside)
        ctx.logits_dtype = logits.dtype
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local_targets, outside = ctx.saved_tensors
        grad_logits = softmax.clone()
        grad_logits.scatter_add_(-1, local_targets.unsqueeze(-1), -(~outside).to(softmax.dtype).unsqueeze(-1))
        return (grad_logits * grad.unsqueeze(-1)).to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group: TensorCollectives, start: int, vocab_size: int
) -> torch.Tensor:
    """Per-token loss of `targets` under the logits of this rank's vocabulary slice [start, start + width)."""
    return _VocabParallelCrossEntropy.apply(logits, targets, group, start, vocab_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The head's matmul and the cross-entropy, `chunk` rows at a time, with each chunk's gradients
    made in the forward (softmax minus the one-hot target): the logits exist for one chunk at a time
    and backward only scales what was kept (the rows' and the weight's gradients), so nothing is
    computed twice. In fp32 whatever the autocast. `group` None: the whole vocabulary here."""

    @staticmethod
    def forward(
        ctx: Any,
        rows: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        group: TensorCollectives | None,
        start: int,
        vocab_size: int,
    ) -> torch.Tensor:
        with torch.autocast(rows.device.type, enabled=False):
            x, w = rows.float(), weight.float()
            grad_rows, grad_weight = torch.empty_like(x), torch.zeros_like(w)
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            padding = torch.arange(start, start + w.shape[0], device=x.device) >= vocab_size
            for first in range(0, len(x), chunk):
                part = slice(first, first + chunk)
                loss, grad_logits = _loss_and_gradient(x[part] @ w.t(), targets[part], padding, group, start)
                total += loss
                grad_rows[part] = grad_logits @ w
                grad_weight.addmm_(grad_logits.t(), x[part])
        ctx.save_for_backward(grad_rows.to(rows.dtype), grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_rows, grad_weight = ctx.saved_tensors
        return grad_rows * grad, grad_weight * grad, None, None, None, None, None


def _loss_and_gradient(
    logits: torch.Tensor,
    targets: torch.Tensor,
    padding: torch.Tensor,
    group: TensorCollectives | None,
    start: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's loss sum over its trained targets (not IGNORE) and its gradient in the logits,
    reducing the max, the target's logit and the sum of exponentials over `group`."""
    trained = targets != IGNORE
    logits = logits.masked_fill_(padding, float("-inf"))
    peak = logits.max(dim=-1).values.contiguous()
    logits -= (group.allreduce_(peak, op="max") if group else peak).unsqueeze(-1)
    outside = (targets < start) | (targets >= start + logits.shape[-1]) | ~trained
    local_targets = (targets - start).masked_fill(outside, 0)
    target_logit = logits.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    softmax = logits.exp_()
    sum_exp = softmax.sum(dim=-1).contiguous()
    if group is not None:
        target_logit, sum_exp = group.allreduce_(target_logit.contiguous()), group.allreduce_(sum_exp)
    loss = ((sum_exp.log() - target_logit) * trained).sum()
    softmax /= sum_exp.unsqueeze(-1)
    softmax.scatter_add_(-1, local_targets.unsqueeze(-1), -(~outside).to(softmax.dtype).unsqueeze(-1))
    return loss, softmax.mul_(trained.unsqueeze(-1))


def chunked_linear_cross_entropy(
    rows: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    group: TensorCollectives | None = None,
    start: int = 0,
    vocab_size: int = 0,
) -> torch.Tensor:
    """The sum over the trained `targets` of the cross-entropy of `rows` [tokens, width] @ `weight`^T
    (this rank's vocabulary slice [start, start + rows of weight) under `group`, else all of it),
    `chunk` tokens at a time (_ChunkedLinearCrossEntropy). Under TP, `rows` must come through
    copy_to_region, which sums their gradient over the group."""
    return _ChunkedLinearCrossEntropy.apply(
        rows, weight, targets, chunk, group, start, vocab_size or weight.shape[0]
    )
