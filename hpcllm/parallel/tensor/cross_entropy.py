"""Cross-entropy over logits split by vocabulary across the TP group, never gathering them: the max,
the target's logit and the sum of exponentials are reduced over the group (Megatron's algorithm).
Padded vocabulary ids (beyond the real vocabulary) are masked out."""

from __future__ import annotations

from typing import Any

import torch

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
