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


def gradient_pieces(model: nn.Module) -> list[tuple[Sharding, torch.Tensor]]:
    """Every parameter's gradient with its sharding, for the norm and clipping of a step."""
    sharding = model_sharding(model)
    return [
        (sharding[name], param.grad) for name, param in model.named_parameters() if param.grad is not None
    ]


def global_grad_norm(
    pieces: list[tuple[Sharding, torch.Tensor]],
    group: TensorCollectives,
    pipeline_comm: Any = None,
    dp_comm: Any = None,
) -> float:
    """The norm of the *full* model's gradient, from this rank's `pieces`: partitioned slices are
    summed over the TP group, replicated parameters counted once (they are identical on every TP
    rank), and with a pipeline the stages' sums are added (a pipeline copy of a tied weight left
    out). `dp_comm`: the pieces are this rank's shares of the reduced gradients (zero = 2), summed
    over the DP group too. Equal on every rank."""
    squares = torch.zeros(2, dtype=torch.float64)  # partitioned, replicated
    for sharding, grad in pieces:
        if not sharding.pipeline_copy:
            squares[0 if sharding.partitioned else 1] += grad.detach().double().pow(2).sum().cpu()
    if dp_comm is not None:
        from mpi4py import MPI

        with watchdog.waiting("gradient-norm allreduce over data-parallel shares"):
            dp_comm.Allreduce(MPI.IN_PLACE, squares.numpy(), op=MPI.SUM)
    partitioned = group.allreduce_(squares[:1].clone())[0]
    total_square = float(partitioned + squares[1])
    if pipeline_comm is not None:
        with watchdog.waiting("gradient-norm allreduce over stages"):
            total_square = pipeline_comm.allreduce(total_square)
    return total_square**0.5


def clip_gradients_(gradients: list[torch.Tensor], norm: float, max_norm: float) -> None:
    """Scale every gradient so that a full-model gradient of norm `norm` has at most `max_norm`."""
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for grad in gradients:
            grad.detach().mul_(scale)
