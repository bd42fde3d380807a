"""The links a group's collectives use, and the time of a ring collective over them."""

from __future__ import annotations

from hpcllm.planner.profiles import ClusterProfile


def ring_seconds(nbytes: float, ranks: int, gbps: float, latency_us: float, efficiency: float) -> float:
    """A ring allreduce of `nbytes` over `ranks`: 2(n-1)/n of the bytes at the link rate, 2(n-1) steps."""
    if ranks == 1:
        return 0.0
    steps = 2 * (ranks - 1)
    return steps / ranks * nbytes / (gbps * 1e9 * efficiency) + steps * latency_us * 1e-6


def link(cluster: ClusterProfile, inside_node: bool) -> tuple[float, float]:
    """GB/s and latency of the links a group uses: NVLink (or shared memory) inside a node."""
    if inside_node:
        return cluster.intra_node_gbps, cluster.intra_node_latency_us
    return cluster.inter_node_gbps, cluster.inter_node_latency_us


def context_ring_seconds(
    cp: int, tp: int, kv_bytes: float, cluster: ClusterProfile, ranks_per_node: int
) -> float:
    """Context parallelism, per layer and micro-batch: the key and value blocks (1/cp of the
    sequence's `kv_bytes`, this TP rank's heads) go cp − 1 hops forward and, with their gradients,
    cp hops backward: about 3 (cp − 1) block transfers, counted whole (not hidden behind attention)."""
    if cp == 1:
        return 0.0
    gbps, latency = link(cluster, tp * cp <= ranks_per_node)
    block = 2 * kv_bytes / cp / tp  # keys and values
    return 3 * (cp - 1) * (block / (gbps * 1e9 * cluster.collective_efficiency) + latency * 1e-6)
