"""The optimizer side of a step: AdamW with its parameter groups, the learning-rate schedule, and
clipping by the norm of the full model's gradient (read through the declared sharding)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hpcllm.cluster import watchdog
from hpcllm.parallel.sharding import Sharding, model_sharding
from hpcllm.parallel.tensor.collectives import TensorCollectives
from hpcllm.training.config import TrainConfig


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < train.warmup:
        return train.lr * (step + 1) / train.warmup
    progress = (step - train.warmup) / max(1, train.steps - train.warmup)
    return train.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (train.lr - train.min_lr)


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
    return torch.optim.AdamW(parameter_groups(model, train), lr=train.lr, betas=BETAS, eps=EPS)


def global_grad_norm(
    model: nn.Module,
    group: TensorCollectives,
    pipeline_comm: Any = None,
    sharding: dict[str, Sharding] | None = None,
) -> float:
    """The norm of the *full* model's gradient: partitioned slices are summed over the TP group,
    replicated parameters counted once (they are identical on every TP rank), and with a pipeline
    the stages' sums are added (a pipeline copy of a tied weight left out). Equal on every rank.
    `sharding`: `model_sharding(model)`, computed once by a caller that asks every step."""
    sharding = sharding if sharding is not None else model_sharding(model)
    partitioned = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for name, param in model.named_parameters():
        if param.grad is None or sharding[name].pipeline_copy:
            continue
        square = param.grad.detach().double().pow(2).sum().cpu()
        if sharding[name].partitioned:
            partitioned += square
        else:
            replicated += square
    partitioned = group.allreduce_(partitioned.reshape(1)).reshape(())
    total_square = float(partitioned + replicated)
    if pipeline_comm is not None:
        with watchdog.waiting("gradient-norm allreduce over stages"):
            total_square = pipeline_comm.allreduce(total_square)
    return total_square**0.5


def clip_gradients_(model: nn.Module, norm: float, max_norm: float) -> None:
    """Scale every gradient so that a full-model gradient of norm `norm` has at most `max_norm`."""
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.detach().mul_(scale)
