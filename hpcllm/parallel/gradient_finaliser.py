"""The end of a step's backward, in one place and one order, and the step's numbers.

After the last backward (`finish`):
  1. the tied embedding's gradient, held by the first and the last pipeline stage, is summed over
     the two (the grid's embedding group);
  2. the gradients of the sequence-parallel parameters, partial on every TP rank, are summed over
     the TP group (one allreduce for all of them);
  3. the data-parallel reduction of what is left (the late bucket: the parameters of 1 and 2) is
     started, and every reduction in flight is waited for (`DataParallel.synchronize`).
Sums over TP and stages commute with the DP average, so 1 and 2 may come before 3.

Then `step_numbers` reduces the step's loss and the gradient norm's partial sums together, read
from the device once: one host collective per axis, DP, then TP, then PP (an axis of size 1 costs
nothing). Each axis sums only what is split over it:
  DP   the loss (every replica saw other samples); the norm's sums when the strategy shards gradients
  TP   the sums of squares of the partitioned gradients (replicated ones are equal on every TP rank)
  PP   all three: the loss lives on the last stage, each stage holds its own layers' gradients
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hpcllm.cluster import watchdog
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.mpi_buffers import mpi_buffer
from hpcllm.parallel.tensor.collectives import TensorCollectives

LOSS, PARTITIONED, REPLICATED = 0, 1, 2  # the entries of a step's numbers


def reduce_entries(comm: Any, values: np.ndarray, summed: Sequence[bool], what: str) -> np.ndarray:
    """One allreduce of `values` (float64) over `comm`; the entries not `summed` keep this rank's
    value (they are equal over the group). Nothing is sent over a group of one."""
    if comm.Get_size() == 1 or not any(summed):
        return values
    from mpi4py import MPI

    total = np.empty_like(values)
    with watchdog.waiting(what):
        comm.Allreduce(values, total, op=MPI.SUM)
    return np.where(np.asarray(summed), total, values)


@dataclass
class GradientFinaliser:
    grid: Grid
    dp: DataParallel
    tp_group: TensorCollectives
    tied_weight: torch.nn.Parameter | None  # on the first and last of several stages
    sequence_parallel: list[torch.nn.Parameter] = field(default_factory=list)
    pp_backend: str = "mpi4py"  # mpi4py | torch, for the tied-embedding sum

    def finish(self) -> None:
        """After the step's last backward: steps 1-3 of the module's docstring."""
        self.dp.synchronize(self._sum_over_other_groups)

    def _sum_over_other_groups(self) -> None:
        self._sum_tied_gradient()
        self._sum_sequence_parallel_gradients()

    def _sum_tied_gradient(self) -> None:
        comm, weight = self.grid.embedding_comm, self.tied_weight
        if self.grid.layout.pp == 1 or comm is None or weight is None:
            return
        grad = self.dp.late_gradient(weight)  # contiguous: a view of the gradient buffer or shard
        if grad is None:
            return
        with watchdog.waiting("tied-embedding gradient allreduce"):
            if self.pp_backend == "torch":
                import torch.distributed as dist

                dist.all_reduce(grad, group=self.grid.torch_groups["embedding"])
            else:
                from mpi4py import MPI

                comm.Allreduce(MPI.IN_PLACE, mpi_buffer(grad), op=MPI.SUM)

    def _sum_sequence_parallel_gradients(self) -> None:
        # Fully sharded, a rank holds shares of some of them, alike on every rank of its TP group.
        grads = [g for g in map(self.dp.late_gradient, self.sequence_parallel) if g is not None]
        if not grads:
            return
        flat = self.tp_group.allreduce_(torch.cat([g.reshape(-1) for g in grads]))
        for grad, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(summed.view_as(grad))

    def step_numbers(self, loss_sum: torch.Tensor, squares: torch.Tensor) -> tuple[float, float]:
        """(the global batch's loss sum, the full model's gradient norm) from this rank's loss sum
        and its (partitioned, replicated) sums of squares: one device read, one collective per axis."""
        values = np.array(torch.cat([loss_sum.double().reshape(1), squares.double()]).tolist())
        shares = self.dp.strategy.norm_from_shares
        if self.grid.hybrid:  # the shares are split over one node's DP ranks, and copied on the others
            values = reduce_entries(
                self.grid.dp_shard_comm, values, (False, shares, shares), "norm over a node"
            )
            shares = False
        values = reduce_entries(
            self.grid.dp_comm, values, (True, shares, shares), "loss and norm allreduce over DP"
        )
        values = reduce_entries(self.grid.tp_comm, values, (False, True, False), "norm allreduce over TP")
        values = reduce_entries(
            self.grid.pp_comm, values, (True, True, True), "loss and norm allreduce over stages"
        )
        return float(values[LOSS]), float(values[PARTITIONED] + values[REPLICATED]) ** 0.5

    def loss_sum(self, local: float) -> float:
        """An evaluation's loss sum over the global batch (the last stage's, summed over DP)."""
        values = np.array([local], dtype=np.float64)
        values = reduce_entries(self.grid.dp_comm, values, (True,), "evaluation loss allreduce over DP")
        return float(reduce_entries(self.grid.pp_comm, values, (True,), "evaluation loss over stages")[0])

    def count_over_dp(self, local: int) -> int:
        """A count of this rank's samples (trained targets) summed over the DP group."""
        values = np.array([local], dtype=np.float64)
        return int(reduce_entries(self.grid.dp_comm, values, (True,), "trained-token count over DP")[0])
