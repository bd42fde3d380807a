"""Data-parallel communication: Horovod keeps the replicas of one model partition identical.

Gradients are averaged over the DP process set of the grid (Horovod is started by the grid) in
buckets whose reductions start from backward hooks (`GradientBuckets`), after every
`allreduce_every` micro-batches; when the strategy (parallel.dp_strategy) shards gradients they are
reduce-scattered for the distributed optimizer instead; when it shards parameters (zero = 3) the
model's units are sharded instead (`FullyShardedUnits`), which gather and reduce-scatter from the
model's gate and backward hooks. Initial parameters and optimizer state are broadcast from the
group's first rank (except fully sharded: each rank cut its shares from the same seeded values).
With dp = 1 nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from hpcllm.parallel.distributed_optimizer import FullyShardedAdamW, ShardedAdamW
from hpcllm.parallel.dp_strategy import REPLICATED, DataParallelStrategy
from hpcllm.parallel.fully_sharded import FullyShardedUnits, UnitValues
from hpcllm.parallel.grad_buckets import GradientBuckets
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.sharding import Sharding, model_sharding

MB = 1024 * 1024


class DataParallel:
    def __init__(self, grid: Grid, strategy: DataParallelStrategy = REPLICATED):
        self.grid = grid
        self.strategy = strategy
        self.size = grid.layout.replicas  # dp × cp ranks reduce gradients together
        self.hvd = grid.hvd if self.size > 1 else None
        self.gradients: GradientBuckets | FullyShardedUnits | None = None

    def bucket_gradients(
        self,
        model: torch.nn.Module,
        late: Sequence[torch.nn.Parameter],
        bucket_mb: float,
        allreduce_every: int,
        fp16_compression: bool = False,
    ) -> GradientBuckets:
        """Lay the model's gradients out in buckets reduced from backward hooks (see GradientBuckets);
        `late`: parameters summed over another group first, reduced at the end of the step."""
        self.gradients = GradientBuckets(
            list(model.parameters()),
            late,
            int(bucket_mb * MB),
            self.size,
            self.grid.dp_rank,
            self.hvd,
            self.grid.dp_process_set if self.hvd is not None else None,
            reduce=self.strategy.reduction,
            every=allreduce_every,
            fp16=fp16_compression,
        )
        return self.gradients

    def fully_shard(
        self, model: Any, reduce_every: int, values: UnitValues | None, device: torch.device
    ) -> FullyShardedUnits:
        """Shard the model's units (`model.shard_units()`) over the DP group (zero = 3) and make them
        its gate; `values`: each unit's whole parameters, for a model built on the meta device."""
        assert self.hvd is not None, "the plan refuses zero with dp = 1"
        shard_rank, shard_size, shard_set = self.grid.dp_shard
        units = FullyShardedUnits(
            model.shard_units(),
            model,
            shard_size,
            shard_rank,
            self.hvd,
            shard_set,
            reduce_every,
            values,
            device,
            replicas=self.grid.dp_replicas[1],
        )
        model.gate = self.gradients = units
        return units

    def sharded_optimizer(
        self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float
    ) -> ShardedAdamW:
        """AdamW with its state sharded over the DP group (the strategy shards the optimizer)."""
        assert self.hvd is not None and self.gradients is not None, "the plan refuses zero with dp = 1"
        if isinstance(self.gradients, FullyShardedUnits):
            return FullyShardedAdamW(groups, self.gradients, lr, betas, eps)
        return ShardedAdamW(groups, self.gradients, lr, betas, eps)

    def gradient_pieces(
        self, model: torch.nn.Module, pieces: list[tuple[Sharding, torch.Tensor]]
    ) -> list[tuple[Sharding, torch.Tensor]]:
        """What the step's norm and clipping read: the model's gradients (`pieces`), or, when the
        strategy shards gradients, this rank's shares of the reduced ones (views, valid at every step)."""
        if not self.strategy.shards_gradients or self.gradients is None:
            return pieces
        sharding = model_sharding(model)
        sharding_of = {id(param): sharding[name] for name, param in model.named_parameters()}
        return [(sharding_of[id(param)], part) for param, part in self.gradients.shard_pieces()]

    def broadcast_initial_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Every replica starts from its group's first rank (they agree already when seeded alike;
        this makes it true by construction, and carries resumed optimizer state)."""
        if self.hvd is None or self.strategy.shards_parameters:
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

    def memory_figures(self) -> dict[str, int]:
        """Fully sharded: the parameter storage this rank holds (FullyShardedUnits.memory_figures)."""
        return self.gradients.memory_figures() if isinstance(self.gradients, FullyShardedUnits) else {}

    def late_gradient(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """What a sum over another group (TP, the tied stages) adds up for `param`: its gradient, or,
        fully sharded, this rank's share of it after the DP reduction (None if it holds none)."""
        if isinstance(self.gradients, FullyShardedUnits):
            return self.gradients.late_piece(param)
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        return param.grad.detach()

    def zero_grad(self) -> None:
        assert self.gradients is not None
        self.gradients.zero_()

    def wait(self) -> None:
        """Between micro-batches, at the end of a reduction group: the reductions started by the
        backward hooks complete before the next backward writes into their buckets."""
        assert self.gradients is not None
        self.gradients.wait()

    def synchronize(self, sum_late: Callable[[], None]) -> None:
        """After the step's last backward: every gradient reduced (the late ones after `sum_late`)."""
        assert self.gradients is not None
        self.gradients.finish(sum_late)
