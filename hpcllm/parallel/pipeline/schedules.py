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
from hpcllm.parallel.mpi_buffers import mpi_buffer
from hpcllm.parallel.pipeline import p2p
from hpcllm.parallel.pipeline.p2p import tag


@dataclass
class StepStats:
    loss: torch.Tensor  # on the last stage the step's mean loss, on the device (0 elsewhere): read it
    # with `loss_from_last`, once
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
        backend: str = "mpi4py",
    ):
        """`tied_weight`: on the first and last stage, the weight both hold (the token embedding);
        `backend`: parallel.pp_backend, resolved (mpi4py | torch)."""
        self.model = model
        self.tied_weight = tied_weight
        self.grid = grid
        self.schedule = schedule
        self.stage, self.pp = grid.pp_rank, grid.layout.pp
        self.first, self.last = self.stage == 0, self.stage == self.pp - 1
        self.hidden_shape = hidden_shape
        self.autocast = autocast
        self.device = device
        self.backend = backend
        self.link = p2p.link(backend, grid.pp_comm, grid.pp_world_ranks)

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
        return inputs, output, scale

    def _backward(self, micro: int, saved: Any) -> None:
        inputs, output, scale = saved
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
        most_live, backwards = 0, 0
        total = torch.zeros((), device=self.device)  # the losses stay on the device: no host read

        def forward(micro: int) -> None:
            nonlocal most_live
            saved = self._forward(micro, batches[micro], scale)
            if self.last:
                total.add_(saved[1].detach().float())
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
        return StepStats(total / m, most_live, self.link.waited_s)

    @torch.no_grad()
    def eval_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        total = 0.0
        for micro, batch in enumerate(batches):
            _, output, _ = self._forward(micro, batch, 1.0)
            total += output.item() if self.last else 0.0
        self.link.finish()
        return self.loss_from_last(total / len(batches))

    def loss_from_last(self, value: float) -> float:
        """The loss lives on the last stage; every stage of the pipeline gets it (rank 0 logs it).
        Collective over the pipeline; `value` is read on the last stage only."""
        return float(self.grid.pp_comm.bcast(value if self.last else None, root=self.pp - 1))

    def sum_tied_gradients(self) -> None:
        """Sum the tied embedding's gradient over its first- and last-stage copies."""
        comm, weight = self.grid.embedding_comm, self.tied_weight
        if self.pp == 1 or comm is None or weight is None:
            return
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad.detach()  # contiguous: a view of the gradient buffer
        with watchdog.waiting("tied-embedding gradient allreduce"):
            if self.backend == "torch":
                import torch.distributed as dist

                dist.all_reduce(grad, group=self.grid.torch_groups["embedding"])
            else:
                from mpi4py import MPI

                comm.Allreduce(MPI.IN_PLACE, mpi_buffer(grad), op=MPI.SUM)
