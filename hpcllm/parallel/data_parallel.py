"""Data-parallel communication: Horovod keeps the replicas of one model partition identical.

Gradients are averaged by Horovod's ring-allreduce (tensor fusion, optional fp16 compression) over
the DP process set of the grid (Horovod is started by the grid), after every `allreduce_every`
micro-batches; initial parameters and optimizer state are broadcast from the group's first rank.
Scalars (losses for the log) are averaged over the DP communicator with mpi4py. With dp = 1
nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from hpcllm.cluster import watchdog
from hpcllm.parallel.distributed_optimizer import ShardedAdamW
from hpcllm.parallel.grid import Grid


class DataParallel:
    def __init__(self, grid: Grid):
        self.grid = grid
        self.size = grid.layout.dp
        self.hvd = grid.hvd if self.size > 1 else None

    def wrap_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        allreduce_every: int,
        fp16_compression: bool = False,
    ) -> torch.optim.Optimizer:
        """Horovod's optimizer: gradients are allreduced after every `allreduce_every` micro-batches
        (all of a step by default); the trainer waits for each such allreduce."""
        if self.hvd is None:
            return optimizer
        hvd = self.hvd
        return hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if fp16_compression else hvd.Compression.none,
            backward_passes_per_step=allreduce_every,
            op=hvd.Average,
            process_set=self.grid.dp_process_set,
        )

    def sharded_optimizer(
        self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float
    ) -> ShardedAdamW:
        """AdamW with its state sharded over the DP group (parallel.zero = 1)."""
        assert self.hvd is not None, "the plan refuses parallel.zero with dp = 1"
        return ShardedAdamW(
            groups, self.hvd, self.grid.dp_process_set, self.size, self.grid.dp_rank, lr, betas, eps
        )

    def broadcast_initial_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Every replica starts from its group's first rank (they agree already when seeded alike;
        this makes it true by construction, and carries resumed optimizer state)."""
        if self.hvd is None:
            return
        root = self.grid.layout.dp_group(self.grid.rank)[0]
        process_set = self.grid.dp_process_set
        # Horovod 0.28's broadcast_parameters/broadcast_optimizer_state know no process sets:
        # broadcast tensor by tensor, in the same order on every rank.
        tensors = list(model.state_dict().values())
        for param in (p for group in optimizer.param_groups for p in group["params"]):
            tensors += [v for _, v in sorted(optimizer.state.get(param, {}).items()) if torch.is_tensor(v)]
        for index, tensor in enumerate(tensors):
            self.hvd.broadcast_(tensor, root_rank=root, name=f"hpcllm.init.{index}", process_set=process_set)

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Wait for the gradient allreduce, so gradients can be clipped before the step."""
        if self.hvd is not None:
            with watchdog.waiting("gradient allreduce (Horovod)"):
                optimizer.synchronize()

    @contextmanager
    def step_without_sync(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        with optimizer.skip_synchronize() if self.hvd is not None else nullcontext():
            yield

    def mean(self, value: float) -> float:
        """Mean of a scalar over the DP group (every DP rank must call it)."""
        if self.size == 1:
            return value
        with watchdog.waiting("loss allreduce"):
            return self.grid.dp_comm.allreduce(value) / self.size
