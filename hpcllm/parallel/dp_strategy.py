"""How data-parallel replicas share the work of a step: the strategy object the trainer, the
optimizer's construction, the gradient buckets, the norm and checkpoints read, instead of an
integer branched on in each of them.

    replicated                  zero = 0: every replica holds and updates everything; gradients allreduced
    sharded optimizer           zero = 1: Adam state sharded over DP, gradients allreduced
    sharded optimizer+gradients zero = 2: and gradients reduce-scattered into each rank's share
    fully sharded               zero = 3: and parameters sharded, gathered unit by unit (FSDP)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataParallelStrategy:
    name: str
    zero: int  # the parallel.zero value that chooses it
    shards_optimizer: bool  # each DP rank keeps and updates its share of the Adam state
    shards_gradients: bool  # gradients are reduce-scattered: a rank holds only its share, reduced
    shards_parameters: bool = False  # a rank keeps 1/dp of each parameter (parallel.fully_sharded)

    @property
    def reduction(self) -> str:
        """What the gradient buckets do over the DP group."""
        return "reducescatter" if self.shards_gradients else "allreduce"

    @property
    def norm_from_shares(self) -> bool:
        """The step's gradient norm is read from this rank's shares, summed over DP."""
        return self.shards_gradients


REPLICATED = DataParallelStrategy("replicated", 0, shards_optimizer=False, shards_gradients=False)
SHARDED_OPTIMIZER = DataParallelStrategy(
    "sharded optimizer", 1, shards_optimizer=True, shards_gradients=False
)
SHARDED_GRADIENTS = DataParallelStrategy(
    "sharded optimizer and gradients", 2, shards_optimizer=True, shards_gradients=True
)
FULLY_SHARDED = DataParallelStrategy(
    "fully sharded", 3, shards_optimizer=True, shards_gradients=True, shards_parameters=True
)
STRATEGIES = {
    strategy.zero: strategy for strategy in (REPLICATED, SHARDED_OPTIMIZER, SHARDED_GRADIENTS, FULLY_SHARDED)
}


def strategy_for(zero: int) -> DataParallelStrategy:
    return STRATEGIES[zero]
