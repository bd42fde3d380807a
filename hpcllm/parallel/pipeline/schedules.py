"""Pipeline schedules: one training or evaluation step of this stage over a list of micro-batches.

    gpipe   all forwards, then all backwards: m micro-batches of activations alive per stage
    1f1b    warm-up forwards, then one forward / one backward, then cool-down: at most `pp`
            micro-batches of activations alive per stage

Activations and their gradients cross stages through `p2p`; the first and last stages both hold
the tied embedding and sum its gradient over the grid's embedding communicator.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hpcllm.cluster import watchdog
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.pipeline.p2p import PointToPoint, tag


@dataclass
class StepStats:
    loss: float
    max_live_activations: int  # micro-batches whose activations this stage held at once
    idle_s: float  # time spent waiting for a neighbour


class StageModel(Protocol):
    """What a schedule needs of the model: run this stage's part, and the loss on the last stage."""

    def forward_stage(self, inputs: torch.Tensor, first: bool, last: bool) -> torch.Tensor: ...

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


class PipelineStage:
    """Runs one training or evaluation step of this stage over a list of micro-batches."""

    def __init__(
        self,
        model: StageModel,
        grid: Grid,
        schedule: str,
        hidden_shape: tuple[int, int, int],
        autocast: Callable[[], Any],
        device: torch.device,
        tied_weight: torch.nn.Parameter | None = None,
    ):
        """`tied_weight`: on the first and last stage, the weight both hold (the token embedding)."""
        self.model = model
        self.tied_weight = tied_weight
        self.grid = grid
        self.schedule = schedule
        self.stage, self.pp = grid.pp_rank, grid.layout.pp
        self.first, self.last = self.stage == 0, self.stage == self.pp - 1
        self.hidden_shape = hidden_shape
        self.autocast = autocast
        self.device = device
        self.link = PointToPoint(grid.pp_comm)

    # one micro-batch each way
    def _forward(self, micro: int, batch: tuple[torch.Tensor, torch.Tensor], scale: float) -> Any:
        x, y = batch
        if self.first:
            inputs = x
        else:
            inputs = self.link.recv(self.hidden_shape, self.stage - 1, tag(micro, False), self.device)
            inputs.requires_grad_(torch.is_grad_enabled())
        with self.autocast():
            output = self.model.forward_stage(inputs, self.first, self.last)
            if self.last:
                output = self.model.loss(output, y)
        if not self.last:
            self.link.send(output, self.stage + 1, tag(micro, False))
        return inputs, output, (output.item() if self.last else 0.0), scale

    def _backward(self, micro: int, saved: Any) -> None:
        inputs, output, _, scale = saved
        if self.last:
            (output * scale).backward()
        else:
            grad = self.link.recv(tuple(output.shape), self.stage + 1, tag(micro, True), self.device)
            torch.autograd.backward(output, grad.to(output.dtype))
        if not self.first:
            self.link.send(inputs.grad, self.stage - 1, tag(micro, True))

    def train_step(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        after_backward: Callable[[int], None] | None = None,
    ) -> StepStats:
        """`after_backward(n)` runs after this stage's n-th backward pass (data-parallel reduction
        every k micro-batches hooks in there)."""
        m = len(batches)
        scale = 1.0 / m
        self.link.waited_s = 0.0
        live: deque[tuple[int, Any]] = deque()
        most_live, total, backwards = 0, 0.0, 0

        def forward(micro: int) -> None:
            nonlocal most_live, total
            saved = self._forward(micro, batches[micro], scale)
            total += saved[2]
            live.append((micro, saved))
            most_live = max(most_live, len(live))

        def backward() -> None:
            nonlocal backwards
            micro, saved = live.popleft()
            self._backward(micro, saved)
            backwards += 1
            if after_backward is not None:
                after_backward(backwards)

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
        comm, weight = self.grid.embedding_comm, self.tied_weight
        if self.pp == 1 or comm is None or weight is None:
            return
        from mpi4py import MPI

        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        buffer = weight.grad.detach().cpu().contiguous()
        with watchdog.waiting("tied-embedding gradient allreduce"):
            comm.Allreduce(MPI.IN_PLACE, buffer.numpy(), op=MPI.SUM)
        weight.grad.copy_(buffer)
