"""The optimizer side of a step: AdamW with its parameter groups, the learning-rate schedule, and
clipping by the norm of the full model's gradient (read through the declared sharding)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hpcllm.parallel.sharding import Sharding, model_sharding
from hpcllm.training.config import TrainConfig


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < train.warmup:
        return train.lr * (step + 1) / train.warmup
    progress = (step - train.warmup) / max(1, train.steps - train.warmup)
    return train.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (train.lr - train.min_lr)


def schedule_warning(train: TrainConfig) -> str | None:
    """What is worth a warning about the schedule: a warmup as long as the run never decays."""
    if train.warmup >= train.steps:
        return (
            f"train.warmup ({train.warmup}) is not shorter than train.steps ({train.steps}): the learning "
            "rate only rises and never decays; leave train.warmup out to get a tenth of the run"
        )
    return None


BETAS = (0.9, 0.95)
EPS = 1e-8


def parameter_groups(model: nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases, LayerNorm gains or position tables' rows)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """torch's AdamW; on CUDA its fused kernel (one launch for all parameters, no host syncs)."""
    fused = True if next(model.parameters()).device.type == "cuda" else None  # None: torch's default
    return torch.optim.AdamW(parameter_groups(model, train), lr=train.lr, betas=BETAS, eps=EPS, fused=fused)


def gradient_pieces(model: nn.Module) -> list[tuple[Sharding, torch.Tensor]]:
    """Every parameter's gradient with its sharding, for the norm and clipping of a step."""
    sharding = model_sharding(model)
    return [
        (sharding[name], param.grad) for name, param in model.named_parameters() if param.grad is not None
    ]


def gradient_square_sums(pieces: list[tuple[Sharding, torch.Tensor]]) -> torch.Tensor:
    """This rank's sums of squares of its gradient pieces, (partitioned, replicated), as a float64
    tensor on their device: one fused norm per kind (`torch._foreach_norm`), no host read. A
    pipeline copy of a tied weight is left out (the other stage counts it)."""
    kinds: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for sharding, grad in pieces:
        if not sharding.pipeline_copy:
            kinds[0 if sharding.partitioned else 1].append(grad.detach())
    device = pieces[0][1].device if pieces else torch.device("cpu")
    sums = [
        torch.stack(torch._foreach_norm(grads)).double().square().sum()
        if grads
        else torch.zeros((), dtype=torch.float64, device=device)
        for grads in kinds
    ]
    return torch.stack(sums)


def clip_gradients_(gradients: list[torch.Tensor], norm: float, max_norm: float) -> None:
    """Scale every gradient so that a full-model gradient of norm `norm` has at most `max_norm`
    (one fused multiply over all of them)."""
    scale = max_norm / (norm + 1e-6)
    if scale < 1 and gradients:
        torch._foreach_mul_([grad.detach() for grad in gradients], scale)
