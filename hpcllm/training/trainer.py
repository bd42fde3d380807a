"""One training step and one evaluation, for this rank's partition of the model.

Per step: this DP rank's micro-batches (from the step-defined sampler) -> forward/backward with
gradient accumulation (through the pipeline schedule when pp > 1), each micro-batch's loss sum
scaled by 1 / (trained targets of the global batch) -> the gradient finaliser (tied and
sequence-parallel sums, Horovod's DP reduction) -> clip -> AdamW step. The loss returned is the
sum over the global batch's trained targets divided by their count, so it does not depend on the
layout, the micro-batch size or gradient accumulation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcllm.batch import IGNORE, Batch
from hpcllm.cluster import faults, runtime, watchdog
from hpcllm.cluster.preemption import StopFlag
from hpcllm.data import choices
from hpcllm.data import tokenizer as tok
from hpcllm.data.loader import micro_batches
from hpcllm.data.mixture import Mixture, Sampler
from hpcllm.errors import UsageError
from hpcllm.model.dropout import DropoutKeys
from hpcllm.model.gpt import GPT
from hpcllm.observe.timing import PhaseTimer
from hpcllm.parallel import replica_check
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.parallel.gradient_finaliser import GradientFinaliser
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.pipeline.schedules import PipelineStage
from hpcllm.parallel.sharding import Sharding
from hpcllm.training import checkpoint
from hpcllm.training.background_save import BackgroundSaver
from hpcllm.training.config import Config
from hpcllm.training.optim import clip_gradients_, gradient_pieces, gradient_square_sums, learning_rate
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
    trained: int  # targets the loss counted over the global batch


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
    finaliser: GradientFinaliser
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
    saver: BackgroundSaver | None = field(init=False)  # with train.async_checkpoint

    def __post_init__(self) -> None:
        self.config = self.plan.config
        self.micro_per_step = self.plan.micro_batches
        self.gradients = self.dp.gradient_pieces(self.model, gradient_pieces(self.model))
        t, m = self.config.train, self.config.model
        self.sampler, self.train_rows = self.data.stream("train", m.block_size, t.seed)
        if getattr(self.train_rows, "truncated", 0):
            log.warning(
                "%d fine-tuning samples are longer than block_size + 1 = %d tokens: each is cut to it",
                self.train_rows.truncated,
                m.block_size + 1,
            )
        self.val_sampler: Sampler | None
        try:
            self.val_sampler, self.val_rows = self.data.stream("val", m.block_size, t.seed + 1)
        except UsageError:
            log.warning("the validation split is shorter than one sequence: no validation loss")
            self.val_sampler = None
        self.tasks = self._read_tasks()
        self.context_positions = self.model.context_positions()
        self.autocast = autocast_for(self.config.train.dtype, self.rt.device)
        self.timer = PhaseTimer(self.rt.device)
        background = self.config.train.async_checkpoint
        if background == "auto":  # the CPU is free while a GPU computes; on a CPU node it is not
            background = "true" if self.rt.device.type == "cuda" else "false"
        keep = self.config.train.keep
        self.saver = BackgroundSaver(self.run_dir, self.grid, keep) if background == "true" else None

    def samples_before(self, step: int) -> int:
        """Samples the run consumed before `step` (the global batch may differ before a resume)."""
        resumed_step, resumed_samples = self.resumed_at
        return resumed_samples + (step - resumed_step) * self.config.train.global_batch

    def _batches(self, sampler: Sampler, reader: Any, first: int) -> tuple[list[Batch], int]:
        """This rank's micro-batches of the global batch starting at sample `first`, on the device,
        and the number of trained targets in the whole global batch."""
        g = self.config.train.global_batch
        indices = sampler.rank_indices(first, g, self.grid.data_rank, self.grid.layout.dp)
        t, block = self.config.train, self.config.model.block_size
        batches = micro_batches(reader, indices, t.micro_batch)
        if self.config.model.dropout:  # keyed by each row's place in the run's sample stream
            start = first + self.grid.data_rank * len(indices)
            batches = [
                replace(batch, dropout=self._dropout_keys(start + i * t.micro_batch, len(batch.tokens)))
                for i, batch in enumerate(batches)
            ]
        if self.data.loss_masked:  # counted over the DP group (the other replicas' samples differ)
            # (each CP rank counts its DP rank's whole rows: the same count cp times)
            counted = self.finaliser.count_over_dp(sum(b.trained_tokens() for b in batches))
            trained = counted // self.grid.layout.cp
        else:  # every target is trained: known without communication
            trained = g * block
        on_device = [batch.to_device(self.rt.device) for batch in batches]
        return [self._context_part(batch) for batch in on_device], trained

    def _context_part(self, batch: Batch) -> Batch:
        """With context parallelism, the positions of the rows this CP rank holds (the model's
        attention reaches the rest by its ring); with documents packed in a row, their positions
        and, in place of the attention mask, each held token's document (the ring hides the other
        documents' keys). The whole batch otherwise."""
        held = self.context_positions
        if held is None:
            return batch
        rows = len(batch.tokens)
        positions = held.expand(rows, -1) if batch.positions is None else batch.positions[:, held]
        documents = None if batch.documents is None else batch.documents[:, held].contiguous()
        return replace(
            batch,
            tokens=batch.tokens[:, held],
            targets=batch.targets[:, held],
            positions=positions,
            documents=documents,
            attention=documents,
        )

    def _dropout_keys(self, first_sample: int, rows: int) -> DropoutKeys:
        samples = torch.arange(first_sample, first_sample + rows, device=self.rt.device)
        return DropoutKeys(self.config.train.seed, samples, self.grid.tp_rank)

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        return self.model.sequence_loss_sum(
            batch.tokens, batch.targets, True, batch.positions, batch.attention, batch.dropout
        )

    def _forward_backward(
        self, batches: list[Batch], scale: float, step: int, after_backward: Callable[[int], None]
    ) -> torch.Tensor:
        """The micro-batches one after another (no pipeline); their loss sum, on the device (read
        once per step, with the gradient norm)."""
        loss_sum = torch.zeros((), device=self.rt.device)
        for index, batch in enumerate(batches, start=1):
            with self.timer.phase("forward"):
                with self.autocast():
                    micro_loss = self._loss_sum(batch)
                if index == 1 and faults.poisons_loss(self.fault, self.rt.rank, self.rt.node_index, step + 1):
                    micro_loss = micro_loss * float("nan")
                loss_sum += micro_loss.detach().float()
            with self.timer.phase("backward"):
                (micro_loss * scale).backward()
            after_backward(index)
        return loss_sum

    def train_step(self, step: int) -> StepResult:
        lr = learning_rate(step, self.config.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.dp.zero_grad()
        timer = self.timer
        with timer.phase("data"):
            batches, trained = self._batches(self.sampler, self.train_rows, self.samples_before(step))
        # Each loss sum's share of the global mean; the DP reduction averages (Horovod's Average),
        # so a replica's share is counted dp times here and divided by dp there.
        scale = self.grid.layout.replicas / trained
        every = self.plan.allreduce_every

        def reduce_early(done: int) -> None:
            # Averaging a partial sum is exact: what was averaged before is equal on every
            # replica, so mean(averaged + local) = averaged + mean(local).
            if done % every == 0 and done < len(batches):
                with timer.phase("allreduce"):
                    self.dp.wait()

        if self.pipeline is not None:
            with timer.phase("pipeline"):
                loss_sum = self.pipeline.train_step(batches, scale, after_backward=reduce_early).loss
        else:
            loss_sum = self._forward_backward(batches, scale, step, reduce_early)
        with timer.phase("allreduce"):
            self.finaliser.finish()
        with timer.phase("optimizer"):
            # The step's one host read: the loss and the gradient's sums of squares together,
            # reduced in one collective per axis.
            global_sum, norm = self.finaliser.step_numbers(loss_sum, gradient_square_sums(self.gradients))
            loss = global_sum / trained
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
        return StepResult(loss, norm, skipped, trained)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_sampler is None:
            return None
        self.model.eval()
        total, count = torch.zeros((), device=self.rt.device), 0  # added on the device, read once
        for index in range(self.config.train.eval_steps):  # the same batches at every evaluation
            first = index * self.config.train.global_batch
            batches, trained = self._batches(self.val_sampler, self.val_rows, first)
            count += trained
            if self.pipeline is not None:
                total += self.pipeline.eval_step(batches)
                continue
            for batch in batches:
                with self.autocast():
                    total += self._loss_sum(batch).float()
        return self.finaliser.loss_sum(total.item()) / count

    def _read_tasks(self) -> tuple[list[choices.Example], list[Batch]]:
        """Collective: train.eval_tasks' examples (checked by rank 0: bad input ends every rank
        alike) and their rows in micro-batches, the last filled with rows that train nothing."""
        path = self.config.train.eval_tasks
        if not path:
            return [], []
        examples = runtime.root_decides(self.rt.comm, lambda: choices.read_examples(path))
        tokenizer = tok.load(self.data.primary.tokenizer_path)
        rows = choices.example_rows(tokenizer, examples, self.config.model.block_size)
        size = self.config.train.micro_batch
        rows += [(rows[0][0], np.full_like(rows[0][1], IGNORE))] * (-len(rows) % size)
        return examples, choices.batches_of(rows, size)

    @torch.no_grad()
    def evaluate_tasks(self) -> dict[str, float] | None:
        """Collective: accuracy on train.eval_tasks (hpcllm.data.choices). DP replica r scores
        micro-batches r, r + dp, ...; the last stage's first TP rank of each holds the rows' loss
        sums (with context parallelism, each CP rank scores the positions it holds, summed over CP)."""
        examples, batches = self.tasks
        if not examples:
            return None
        self.model.eval()
        mine = list(range(self.grid.data_rank, len(batches), self.grid.layout.dp))
        on_device = [self._context_part(batches[i].to_device(self.rt.device)) for i in mine]
        with self.autocast():
            if self.pipeline is not None:
                sums = self.pipeline.eval_step(on_device, per_row=True)
            else:
                parts = [
                    self.model.row_loss_sums(self.model(b.tokens, b.positions, mask=b.attention), b.targets)
                    for b in on_device
                ]
                sums = torch.cat(parts) if parts else torch.zeros(0)
        holds = self.grid.is_last_stage and self.grid.tp_rank == 0
        if holds and self.grid.layout.cp > 1:  # every CP rank of a group holds, or none
            sums = torch.from_numpy(self.grid.cp_comm.allreduce(sums.float().cpu().numpy()))
            holds = self.grid.cp_rank == 0
        gathered = self.grid.world.gather((mine, sums.float().tolist()) if holds else None, root=0)
        if self.rt.rank != 0:
            return {}
        size = self.config.train.micro_batch  # rows per batch, the last one filled (_read_tasks)
        by_batch = {}
        for indices, sums_of_rows in filter(None, gathered):
            by_batch |= {i: sums_of_rows[k * size : (k + 1) * size] for k, i in enumerate(indices)}
        row_sums = [x for i in range(len(batches)) for x in by_batch[i]]
        scored = choices.score(examples, row_sums)
        return {"accuracy": scored["accuracy"], "accuracy_norm": scored["accuracy_norm"]}

    def check_replicas(self, step: int) -> None:
        """Collective: the DP replicas hold bitwise the same parameters, or every rank raises
        ReplicaDrift (hpcllm.parallel.replica_check). Fully sharded, the DP ranks hold different
        shares: there is nothing to compare."""
        if self.grid.layout.replicas > 1 and not self.dp.strategy.shards_parameters:
            with watchdog.waiting("replica check"):
                named = list(self.model.named_parameters())
                replica_check.check(named, self.grid.dp_comm, self.grid.world, self.rt.rank, step)

    @torch.no_grad()
    def corrupt_a_parameter(self) -> None:
        """The `corrupt` fault (HPCLLM_FAULT): one bit of this rank's first parameter flipped."""
        first = next(self.model.parameters()).data.view(-1)
        bits = first.view(replica_check.BITS[first.element_size()])
        bits[:1].bitwise_xor_(1 << 12)

    def save(self, step: int) -> None:
        """Collective: the replicas are checked first (when train.check_replicas_every is on), so
        a drifted run never saves its damage; then the checkpoint, written in the background with
        train.async_checkpoint (complete at a later step's `poll_checkpoint`)."""
        if self.config.train.check_replicas_every:
            self.check_replicas(step)
        sampler = {
            "step": step,
            "seed": self.config.train.seed,
            "consumed_samples": self.samples_before(step),
            "data_sha256": self.data.identity(),
        }
        extra = {"config": self.config.to_dict(), "sampler": sampler}
        fault = self.fault  # the hook may run in the writer thread: it reads nothing of the trainer's state
        rank, node = self.rt.rank, self.rt.node_index

        def after_shard() -> None:
            faults.during_checkpoint(fault, rank, node, step)

        if self.saver is not None:
            self.saver.save(step, self.model, self.optimizer, extra, after_shard)
            return
        keep = self.config.train.keep
        checkpoint.save(self.run_dir, step, self.model, self.optimizer, self.grid, extra, keep, after_shard)

    def poll_checkpoint(self) -> None:
        """Collective, at a step's end: complete a background checkpoint whose writes are done."""
        if self.saver is not None:
            self.saver.poll()

    def finish_checkpoint(self) -> None:
        """Collective: wait for a background checkpoint and complete it (the run is ending)."""
        if self.saver is not None:
            self.saver.wait()
