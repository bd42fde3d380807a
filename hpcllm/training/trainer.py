"""One training step and one evaluation, for this rank's partition of the model.

Per step: this DP rank's micro-batches (from the step-defined sampler) -> forward/backward with
gradient accumulation (through the pipeline schedule when pp > 1) -> Horovod averages gradients
over the DP group -> clip -> AdamW step. The loss returned is the mean over the whole global batch,
reduced over DP, so it does not depend on the layout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpcllm.cluster import faults, runtime
from hpcllm.cluster.preemption import StopFlag
from hpcllm.data.loader import micro_batches
from hpcllm.data.mixture import Mixture, Sampler
from hpcllm.errors import UsageError
from hpcllm.model.gpt import GPT
from hpcllm.observe.timing import PhaseTimer
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.pipeline.schedules import PipelineStage
from hpcllm.parallel.sharding import Sharding, model_sharding
from hpcllm.parallel.tensor.collectives import TensorCollectives
from hpcllm.training import checkpoint
from hpcllm.training.config import Config
from hpcllm.training.optim import (
    clip_gradients_,
    full_gradient_norm,
    gradient_pieces,
    gradient_square_sums,
    learning_rate,
)
from hpcllm.training.plan import Plan

log = logging.getLogger("hpcllm.training")


def autocast_for(dtype: str, device: torch.device) -> Callable[[], Any]:
    if dtype == "bfloat16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the global batch
    grad_norm: float  # of the full model's gradient, before clipping
    skipped: bool  # the gradient was not finite: the optimizer did not step


@dataclass
class Trainer:
    plan: Plan
    rt: runtime.Runtime
    grid: Grid
    data: Mixture
    run_dir: Path
    model: GPT
    optimizer: torch.optim.Optimizer
    dp: DataParallel
    tp_group: TensorCollectives
    full_parameters: int
    pipeline: PipelineStage | None = None
    stop: StopFlag = field(default_factory=StopFlag)
    fault: faults.Fault | None = None  # HPCLLM_FAULT, for the reliability tests
    resumed_at: tuple[int, int] = (0, 0)  # (step, samples consumed by then) of the checkpoint resumed
    timer: PhaseTimer = field(init=False)
    config: Config = field(init=False)  # the plan's, for short
    micro_per_step: int = field(init=False)
    gradients: list[tuple[Sharding, torch.Tensor]] = field(init=False)  # what the norm and clipping read
    skipped_steps: int = 0  # steps whose gradient was not finite

    def __post_init__(self) -> None:
        self.config = self.plan.config
        self.micro_per_step = self.plan.micro_batches
        self.gradients = self._gradient_pieces()
        self.sequence_parallel_parameters = self.model.sequence_parallel_parameters()
        t, m = self.config.train, self.config.model
        self.sampler, self.train_tokens = self.data.stream("train", m.block_size, t.seed)
        self.val_sampler: Sampler | None
        try:
            self.val_sampler, self.val_tokens = self.data.stream("val", m.block_size, t.seed + 1)
        except UsageError:
            log.warning("the validation split is shorter than one sequence: no validation loss")
            self.val_sampler = None
        self.autocast = autocast_for(self.config.train.dtype, self.rt.device)
        self.timer = PhaseTimer(self.rt.device)

    def samples_before(self, step: int) -> int:
        """Samples the run consumed before `step` (the global batch may differ before a resume)."""
        resumed_step, resumed_samples = self.resumed_at
        return resumed_samples + (step - resumed_step) * self.config.train.global_batch

    def _batches(self, sampler: Sampler, tokens: Any, first: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = self.config.train.global_batch
        indices = sampler.rank_indices(first, g, self.grid.dp_rank, self.grid.layout.dp)
        device = self.rt.device

        def to_device(tokens: Any) -> torch.Tensor:
            # To a GPU from pinned memory, asynchronously: the copy does not stall the host.
            if device.type == "cuda":
                return torch.from_numpy(tokens).pin_memory().to(device, non_blocking=True)
            return torch.from_numpy(tokens)

        return [
            (to_device(x), to_device(y))
            for x, y in micro_batches(
                tokens, indices, self.config.model.block_size, self.config.train.micro_batch
            )
        ]

    def train_step(self, step: int) -> StepResult:
        lr = learning_rate(step, self.config.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.dp.zero_grad()
        timer = self.timer
        with timer.phase("data"):
            batches = self._batches(self.sampler, self.train_tokens, self.samples_before(step))
        every = self.plan.allreduce_every

        def reduce_early(done: int) -> None:
            # Averaging a partial sum is exact: what was averaged before is equal on every
            # replica, so mean(averaged + local) = averaged + mean(local).
            if done % every == 0 and done < len(batches):
                with timer.phase("allreduce"):
                    self.dp.wait()

        if self.pipeline is not None:
            with timer.phase("pipeline"):
                loss_sum = self.pipeline.train_step(batches, after_backward=reduce_early).loss
        else:
            # Losses are added on the device and read once, with the gradient norm, per step.
            loss_sum = torch.zeros((), device=self.rt.device)
            for index, (x, y) in enumerate(batches, start=1):
                with timer.phase("forward"):
                    with self.autocast():
                        micro_loss = self.model.loss(self.model(x), y)
                    if index == 1 and faults.poisons_loss(
                        self.fault, self.rt.rank, self.rt.node_index, step + 1
                    ):
                        micro_loss = micro_loss * float("nan")
                    loss_sum += micro_loss.detach().float() / self.micro_per_step
                with timer.phase("backward"):
                    (micro_loss / self.micro_per_step).backward()
                reduce_early(index)
        with timer.phase("allreduce"):
            self.dp.synchronize(self._sum_late_gradients)
        with timer.phase("optimizer"):
            # The step's one host read: the loss and the gradient's sums of squares together.
            squares = gradient_square_sums(self.gradients)
            local_loss, partitioned, replicated = torch.cat([loss_sum.double().reshape(1), squares]).tolist()
            pipeline_comm = self.grid.pp_comm if self.pipeline is not None else None
            if self.pipeline is not None:
                local_loss = self.pipeline.loss_from_last(local_loss)
            loss = self.dp.mean(local_loss)
            dp_shares = self.grid.dp_comm if self.config.parallel.zero == 2 else None
            norm = full_gradient_norm(partitioned, replicated, self.grid.tp_comm, pipeline_comm, dp_shares)
            # The norm is equal on every rank, so every rank skips the same steps.
            skipped = not math.isfinite(norm)
            if skipped:
                self.skipped_steps += 1
                log.warning(
                    "step %d: the gradient norm is %s; step skipped, parameters unchanged (%d so far)",
                    step + 1,
                    norm,
                    self.skipped_steps,
                )
            else:
                if self.config.train.grad_clip > 0:
                    clip_gradients_([grad for _, grad in self.gradients], norm, self.config.train.grad_clip)
                self.optimizer.step()
        timer.step_done()
        return StepResult(loss, norm, skipped)

    def _gradient_pieces(self) -> list[tuple[Sharding, torch.Tensor]]:
        """The gradients the step's norm and clipping read: the model's, or with zero = 2 this rank's
        shares of the reduced gradients (views, valid at every step)."""
        pieces = gradient_pieces(self.model)
        buckets = self.dp.gradients
        if self.config.parallel.zero != 2 or buckets is None:
            return pieces
        sharding = model_sharding(self.model)
        sharding_of = {id(param): sharding[name] for name, param in self.model.named_parameters()}
        return [(sharding_of[id(param)], part) for param, part in buckets.shard_pieces()]

    def _sum_late_gradients(self) -> None:
        """Before the DP reduction of the late bucket: the tied embedding's copies over the first
        and last stage, the sequence-parallel parameters over TP (both commute with the average)."""
        if self.pipeline is not None:
            self.pipeline.sum_tied_gradients()
        self._sum_sequence_parallel_gradients()

    def _sum_sequence_parallel_gradients(self) -> None:
        """One TP allreduce for all of them."""
        parameters = self.sequence_parallel_parameters
        if not parameters:
            return
        flat = self.tp_group.allreduce_(torch.cat([p.grad.reshape(-1) for p in parameters]))
        for param, summed in zip(parameters, flat.split([p.numel() for p in parameters]), strict=True):
            param.grad.copy_(summed.view_as(param.grad))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_sampler is None:
            return None
        self.model.eval()
        total, count = torch.zeros((), device=self.rt.device), 0  # added on the device, read once
        for index in range(self.config.train.eval_steps):  # the same batches at every evaluation
            batches = self._batches(self.val_sampler, self.val_tokens, index * self.config.train.global_batch)
            count += len(batches)
            if self.pipeline is not None:
                total += self.pipeline.eval_step(batches) * len(batches)
                continue
            for x, y in batches:
                with self.autocast():
                    total += self.model.loss(self.model(x), y).float()
        return self.dp.mean(total.item() / count)

    def save(self, step: int) -> Path:
        sampler = {
            "step": step,
            "seed": self.config.train.seed,
            "consumed_samples": self.samples_before(step),
            "data_sha256": self.data.identity(),
        }
        extra = {"config": self.config.to_dict(), "sampler": sampler}
        return checkpoint.save(
            self.run_dir,
            step,
            self.model,
            self.optimizer,
            self.grid,
            extra,
            self.config.train.keep,
            after_shard=lambda: faults.during_checkpoint(self.fault, self.rt.rank, self.rt.node_index, step),
        )
