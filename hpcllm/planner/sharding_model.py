"""The data-parallel strategies in the step model (hpcllm.planner.step_model): the bytes a rank holds
of weights, gradients and Adam state, and the seconds of the DP traffic of a step, by
parallel.zero and parallel.shard_group.

Bytes per parameter of the rank's partition, sharded over `s` ranks (fp32 weights and gradients,
two fp32 Adam moments):
    zero 0   16                 every state whole
    zero 1   8 + 8/s            the Adam state sharded
    zero 2   8 + 12/s           and the reduced gradients (the accumulation buffer stays whole)
    zero 3   16/s               everything sharded, plus what is whole at once: the embedding and
                                head (kept from their forward to their backward) and two blocks'
                                weights (the one computing and the one prefetched) and one
                                block's gradients (flattened for its reduce-scatter)
`s` is the DP group, or with parallel.shard_group = node (hybrid sharding) its ranks on one node.

Traffic per step of the rank's partition's fp32 bytes P over s ranks, as rings ((s-1)/s of P each
for an all-gather or a reduce-scatter, twice that for an allreduce):
    zero 0   allreduce                                  (2)
    zero 1   allreduce + all-gather of the updated      (3)
    zero 2   reduce-scatter + all-gather                (2)
    zero 3   per reduction group (parallel.reduce_every; every micro-batch by default): an
             all-gather in forward, one in backward, a reduce-scatter   (3 per group)
             hybrid: those inside the node, plus an allreduce of the shares (P/s) across nodes
The reductions overlap backward by the profile's `dp_overlap`; zero 3's gathers are prefetched, so
the same share of them is hidden behind compute.
"""

from __future__ import annotations

from collections.abc import Callable

from hpcllm.planner.links import link, ring_seconds
from hpcllm.planner.profiles import ClusterProfile


def shard_ranks(zero: int, shard_group: str, dp: int, tp: int, ranks_per_node: int) -> int:
    """The ranks the states are sharded over: the DP group, or (hybrid) its ranks on one node
    (hpcllm places tp innermost, then dp: a node holds ranks_per_node / tp of a DP group)."""
    if zero == 3 and shard_group == "node":
        return max(1, min(dp, ranks_per_node // tp))
    return dp


def state_bytes(
    zero: int, parameters: float, whole_parameters: float, block_parameters: float, s: int
) -> float:
    """Bytes of weights, gradients and Adam state of `parameters` (the rank's partition) per rank;
    `whole_parameters`: zero 3's units whole at once, `block_parameters`: one block's."""
    if zero == 3:
        return 16 * parameters / s + 4 * whole_parameters + 4 * block_parameters
    return parameters * {0: 16.0, 1: 8 + 8 / s, 2: 8 + 12 / s}[zero]


def traffic_seconds(
    zero: int,
    parameters: float,
    s: int,
    replicas: int,
    groups: int,
    ring: Callable[[float, int], float],
    across: Callable[[float, int], float],
) -> tuple[float, float]:
    """(reduction, gather) seconds of a step, before overlap: `ring(bytes, ranks)` is an allreduce
    over the shard group's links, `across(bytes, ranks)` one over the nodes' (hybrid); `groups`:
    zero 3's reduction groups per step."""
    nbytes = parameters * 4
    allreduce = ring(nbytes, s)
    if zero == 3:
        reduction = groups * allreduce / 2 + (across(nbytes / s, replicas) if replicas > 1 else 0.0)
        return reduction, groups * allreduce  # two all-gathers of half an allreduce each
    reduction = allreduce / 2 if zero == 2 else allreduce
    return reduction, allreduce / 2 if zero else 0.0


def data_parallel_seconds(
    layout: tuple[int, str, int, int, int],
    cluster: ClusterProfile,
    ranks_per_node: int,
    rank_parameters: float,
    slowdown: float,
    groups: int,
) -> tuple[float, float, float]:
    """(exposed DP reduction, ZeRO's all-gathers, optimizer) seconds of a step (sharding_model);
    `groups`: zero = 3's reduction groups per step."""
    zero_level, shard_group, t, p, d = layout  # parallel.zero, shard_group, tp, pp, dp
    s = shard_ranks(zero_level, shard_group, d, t, ranks_per_node)
    efficiency = cluster.collective_efficiency

    def ring(nbytes: float, ranks: int) -> float:  # over the shard group's links
        return ring_seconds(nbytes, ranks, *link(cluster, t * p * s <= ranks_per_node), efficiency)

    def across(nbytes: float, ranks: int) -> float:  # hybrid: between the nodes
        return ring_seconds(nbytes, ranks, *link(cluster, False), efficiency)

    reduction, gather = traffic_seconds(zero_level, rank_parameters, s, d // s, groups, ring, across)
    hidden = 1 - cluster.dp_overlap
    dp, zero = reduction * hidden, gather * (hidden if zero_level == 3 else 1.0)
    # AdamW reads weight, gradient and two moments and writes three of them: 28 bytes per parameter
    # it updates, through memory bandwidth the node's ranks share on a CPU.
    optimizer = 0.0
    if cluster.memory_gbps:
        updated = rank_parameters / (s if zero_level else 1)
        optimizer = updated * 28 * slowdown / (cluster.memory_gbps * 1e9)
    return dp, zero, optimizer
