"""Pipeline schedules: one training or evaluation step of this stage over a list of micro-batches.

    gpipe   all forwards, then all backwards: m micro-batches of activations alive per stage
    1f1b    warm-up forwards, then one forward / one backward, then cool-down: at most `pp`
            micro-batches of activations alive per stage

Activations and their gradients cross stages through `p2p`. The last stage computes each
micro-batch's loss *sum* over its trained targets; backward scales it by the trainer's `scale`
(1 / the trained targets of the global batch), so the step's gradient is that of the global mean. The tied
embedding's gradient is summed by parallel.gradient_finaliser, not here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hpcllm.batch import Batch
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.pipeline import p2p
from hpcllm.parallel.pipeline.p2p import tag


@dataclass
class StepStats:
    loss: torch.Tensor  # on the last stage the step's loss sum, on the device (0 elsewhere)
    max_live_activations: int  # micro-batches whose activations this stage held at once
    idle_s: float  # time spent waiting for a neighbour


class StageModel(Protocol):
    """What a schedule needs of the model: run this stage's part, and the loss sum on the last stage."""

    def forward_stage(
        self,
        inputs: torch.Tensor,
        first: bool,
        last: bool,
        positions: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        keys: Any = None,
    ) -> torch.Tensor: ...

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def row_loss_sums(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


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
        backend: str = "mpi4py",
    ):
        """`backend`: parallel.pp_backend, resolved (mpi4py | torch)."""
        self.model = model
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
    def _forward(self, micro: int, batch: Batch, scale: float, per_row: bool = False) -> Any:
        if self.first:
            inputs = batch.tokens
        else:
            inputs = self.link.recv(self.hidden_shape, self.stage - 1, tag(micro, False), self.device)
            inputs.requires_grad_(torch.is_grad_enabled())
        with self.autocast():
            if self.last and not per_row:  # the loss whole, or chunk by chunk (train.loss_chunk)
                output = self.model.sequence_loss_sum(
                    inputs, batch.targets, self.first, batch.positions, batch.attention, batch.dropout
                )
            else:
                output = self.model.forward_stage(
                    inputs, self.first, self.last, batch.positions, mask=batch.attention, keys=batch.dropout
                )
                if self.last:
                    output = self.model.row_loss_sums(output, batch.targets)
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
        batches: list[Batch],
        scale: float,
        after_backward: Callable[[int], None] | None = None,
    ) -> StepStats:
        """`scale`: what backward multiplies each micro-batch's loss sum by (1 / the trained targets
        of the global batch, times what the DP reduction divides by); `after_backward(n)` runs
        after this stage's n-th backward pass (data-parallel reduction every k micro-batches hooks
        in there)."""
        m = len(batches)
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
        return StepStats(total, most_live, self.link.waited_s)

    @torch.no_grad()
    def eval_step(self, batches: list[Batch], per_row: bool = False) -> torch.Tensor:
        """The loss sum over `batches` on the last stage, on the device (0 elsewhere); `per_row`:
        each row's loss sum instead, in order (empty elsewhere)."""
        total, rows = torch.zeros((), device=self.device), []
        for micro, batch in enumerate(batches):
            _, output, _ = self._forward(micro, batch, 1.0, per_row)
            if self.last and per_row:
                rows.append(output.float())
            elif self.last:
                total += output.float()
        self.link.finish()
        if per_row:
            return torch.cat(rows) if rows else torch.zeros(0, device=self.device)
        return total
