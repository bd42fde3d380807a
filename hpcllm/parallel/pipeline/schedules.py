"""Pipeline parallelism: the layer stack split into stages, micro-batches flowing through them.

Stage partition: blocks are divided into `pp` contiguous stages balanced by parameter count (the
token embedding counts on the first stage, the final norm and the tied output head on the last),
or as `parallel.stage_layers` says. The full model is initialised on every rank and each stage
keeps its own part; block names keep their global index (`blocks.5...`), so checkpoints of
different pipeline sizes name the same tensor alike. The first and last stages both hold the
tied embedding; their gradients are summed over a two-rank communicator so the copies never drift.

Schedules (`parallel.schedule`):
    gpipe   all forwards, then all backwards: m micro-batches of activations alive per stage
    1f1b    warm-up forwards, then one forward / one backward, then cool-down: at most `pp`
            micro-batches of activations alive per stage
Activations go forward and their gradients backward with mpi4py Isend/Irecv on the pipeline
communicator; shapes are known up front ([micro_batch, block_size, n_embd]); sends never block, and
each receive names its source and a tag made of micro-batch and direction, so no order of
schedules, pp or micro-batch count can deadlock.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcllm.cluster import watchdog
from hpcllm.errors import UsageError
from hpcllm.model.gpt import GPT
from hpcllm.parallel.grid import Grid

log = logging.getLogger("hpcllm.parallel.pipeline.schedules")


# ---- stage partition ----------------------------------------------------------------------


def balanced_stages(block_params: list[int], first_extra: int, last_extra: int, pp: int) -> list[int]:
    """Layers per stage minimising the heaviest stage (contiguous, every stage at least one layer)."""
    n = len(block_params)
    if pp > n:
        raise UsageError(f"pp = {pp} stages but only {n} layers: every stage needs a layer; lower --pp")
    prefix = np.concatenate([[0], np.cumsum(block_params)])

    def weight(start: int, end: int, stage: int) -> int:
        w = int(prefix[end] - prefix[start])
        return w + (first_extra if stage == 0 else 0) + (last_extra if stage == pp - 1 else 0)

    # best[s][i]: the lightest heaviest-stage for putting layers [0, i) into stages [0, s].
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp)]
    cut: list[list[int]] = [[0] * (n + 1) for _ in range(pp)]
    for i in range(1, n + 1):
        best[0][i] = weight(0, i, 0)
    for s in range(1, pp):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                candidate = max(best[s - 1][j], weight(j, i, s))
                if candidate < best[s][i]:
                    best[s][i], cut[s][i] = candidate, j
    counts, end = [], n
    for s in range(pp - 1, 0, -1):
        start = cut[s][end]
        counts.append(end - start)
        end = start
    counts.append(end)
    return counts[::-1]


def parse_stage_layers(text: str, n_layer: int, pp: int) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise UsageError(f"parallel.stage_layers must be comma-separated layer counts, not {text!r}") from exc
    if len(counts) != pp or sum(counts) != n_layer or min(counts) < 1:
        raise UsageError(
            f"parallel.stage_layers {text!r} must give {pp} positive counts summing to n_layer = {n_layer}"
        )
    return counts


@dataclass(frozen=True)
class StagePlan:
    layers_per_stage: list[int]

    def layer_range(self, stage: int) -> range:
        start = sum(self.layers_per_stage[:stage])
        return range(start, start + self.layers_per_stage[stage])


def plan_stages(model: GPT, pp: int, stage_layers: str = "") -> StagePlan:
    if stage_layers:
        return StagePlan(parse_stage_layers(stage_layers, len(model.blocks), pp))
    block_params = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    embed = model.wte.weight.numel() + model.wpe.weight.numel()
    head = model.wte.weight.numel() + sum(p.numel() for p in model.ln_f.parameters())
    return StagePlan(balanced_stages(block_params, embed, head, pp))


def keep_stage(model: GPT, plan: StagePlan, stage: int, pp: int) -> GPT:
    """Drop, in place, every part of the full model this stage does not run."""
    mine = plan.layer_range(stage)
    for index in range(len(model.blocks)):
        if index not in mine:
            model.blocks[index] = nn.Identity()  # keeps the global index in parameter names
    if stage != 0:
        model.wpe = None  # type: ignore[assignment]
        model.drop = None  # type: ignore[assignment]
    if stage != pp - 1:
        model.ln_f = None  # type: ignore[assignment]
    if stage not in (0, pp - 1):
        model.wte = None  # type: ignore[assignment]
    model.stage_layers = mine  # type: ignore[attr-defined]
    return model


def run_stage(model: GPT, inputs: torch.Tensor, first: bool, last: bool) -> torch.Tensor:
    """This stage's slice of GPT.forward: ids → hidden (first), hidden → hidden, hidden → logits (last)."""
    hidden = model.embed(inputs) if first else inputs
    for index in model.stage_layers:  # type: ignore[attr-defined]
        hidden = model.blocks[index](hidden)
    return model.head(hidden) if last else hidden


# ---- point to point -----------------------------------------------------------------------


def _tag(micro: int, backward: bool) -> int:
    return 2 * micro + int(backward)


@dataclass
class _Link:
    """Non-blocking sends (buffers kept alive until the step ends) and receives of known shape."""

    comm: Any
    pending: list[tuple[Any, np.ndarray]] = field(default_factory=list)
    waited_s: float = 0.0  # time blocked in receives: this stage's share of the bubble

    def send(self, tensor: torch.Tensor, dest: int, tag: int) -> None:
        buffer = tensor.detach().float().cpu().contiguous().numpy()
        self.pending.append((self.comm.Isend(buffer, dest=dest, tag=tag), buffer))

    def recv(self, shape: tuple[int, ...], source: int, tag: int, device: torch.device) -> torch.Tensor:
        buffer = np.empty(shape, dtype=np.float32)
        start = time.perf_counter()
        with watchdog.waiting(f"pipeline receive from rank {source}"):
            self.comm.Irecv(buffer, source=source, tag=tag).Wait()
        self.waited_s += time.perf_counter() - start
        return torch.from_numpy(buffer).to(device)

    def finish(self) -> None:
        from mpi4py import MPI

        start = time.perf_counter()
        with watchdog.waiting("pipeline sends"):
            MPI.Request.Waitall([request for request, _ in self.pending])
        self.waited_s += time.perf_counter() - start
        self.pending.clear()


# ---- the schedules ------------------------------------------------------------------------


@dataclass
class StepStats:
    loss: float
    max_live_activations: int  # micro-batches whose activations this stage held at once
    idle_s: float  # time spent waiting for a neighbour


class PipelineStage:
    """Runs one training or evaluation step of this stage over a list of micro-batches."""

    def __init__(
        self,
        model: GPT,
        grid: Grid,
        schedule: str,
        hidden_shape: tuple[int, int, int],
        autocast: Callable[[], Any],
        device: torch.device,
    ):
        from mpi4py import MPI

        self.model = model
        self.grid = grid
        self.schedule = schedule
        self.stage, self.pp = grid.pp_rank, grid.layout.pp
        self.first, self.last = self.stage == 0, self.stage == self.pp - 1
        self.hidden_shape = hidden_shape
        self.autocast = autocast
        self.device = device
        self.link = _Link(grid.pp_comm)
        if self.last and not self.first:
            model.wte.weight.pipeline_duplicate = True  # type: ignore[attr-defined]  # counted once in norms
        # The two ranks holding the tied embedding: first and last stage of this pipeline.
        self.tied_comm = grid.pp_comm.Split(0 if (self.first or self.last) else MPI.UNDEFINED, grid.pp_rank)

    # one micro-batch each way
    def _forward(self, micro: int, batch: tuple[torch.Tensor, torch.Tensor], scale: float) -> Any:
        x, y = batch
        if self.first:
            inputs = x
        else:
            inputs = self.link.recv(self.hidden_shape, self.stage - 1, _tag(micro, False), self.device)
            inputs.requires_grad_(torch.is_grad_enabled())
        with self.autocast():
            output = run_stage(self.model, inputs, self.first, self.last)
            if self.last:
                output = self.model.loss(output, y)
        if not self.last:
            self.link.send(output, self.stage + 1, _tag(micro, False))
        return inputs, output, (output.item() if self.last else 0.0), scale

    def _backward(self, micro: int, saved: Any) -> None:
        inputs, output, _, scale = saved
        if self.last:
            (output * scale).backward()
        else:
            grad = self.link.recv(tuple(output.shape), self.stage + 1, _tag(micro, True), self.device)
            torch.autograd.backward(output, grad.to(output.dtype))
        if not self.first:
            self.link.send(inputs.grad, self.stage - 1, _tag(micro, True))

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepStats:
        m = len(batches)
        scale = 1.0 / m
        self.link.waited_s = 0.0
        live: deque[tuple[int, Any]] = deque()
        most_live, total = 0, 0.0

        def forward(micro: int) -> None:
            nonlocal most_live, total
            saved = self._forward(micro, batches[micro], scale)
            total += saved[2]
            live.append((micro, saved))
            most_live = max(most_live, len(live))

        def backward() -> None:
            micro, saved = live.popleft()
            self._backward(micro, saved)

        if self.schedule == "gpipe":
            for micro in range(m):
                forward(micro)
            while live:
                backward()
        else:  # 1f1b: warm up so that the last stage can start backwards at once
            warmup = min(self.pp - self.stage - 1, m)
            for micro in range(warmup):
                forward(micro)
            for micro in range(warmup, m):
                forward(micro)
                backward()
            while live:
                backward()
        self.link.finish()
        waited = self.link.waited_s  # before the loss broadcast, which is not part of the schedule
        return StepStats(self._loss_from_last(total / m), most_live, waited)

    @torch.no_grad()
    def eval_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        total = 0.0
        for micro, batch in enumerate(batches):
            total += self._forward(micro, batch, 1.0)[2]
        self.link.finish()
        return self._loss_from_last(total / len(batches))

    def _loss_from_last(self, value: float) -> float:
        """The loss lives on the last stage; every stage of the pipeline gets it (rank 0 logs it)."""
        return float(self.grid.pp_comm.bcast(value, root=self.pp - 1))

    def sum_tied_gradients(self) -> None:
        """Sum the tied embedding's gradient over its first- and last-stage copies."""
        if self.pp == 1 or self.tied_comm == _comm_null():
            return
        grad = self.model.wte.weight.grad
        if grad is None:
            grad = self.model.wte.weight.grad = torch.zeros_like(self.model.wte.weight)
        from mpi4py import MPI

        buffer = grad.detach().cpu().contiguous()
        with watchdog.waiting("tied-embedding gradient allreduce"):
            self.tied_comm.Allreduce(MPI.IN_PLACE, buffer.numpy(), op=MPI.SUM)
        grad.copy_(buffer)


def _comm_null() -> Any:
    from mpi4py import MPI

    return MPI.COMM_NULL
