"""The pp × dp × cp × tp layout: pure arithmetic of coordinates and groups (testable without MPI).

Rank order is Megatron's: TP varies fastest (tensor-parallel neighbours share a node and its fast
links), then CP (context parallelism passes every layer's keys and values around its ring: the
next-heaviest traffic, so its ranks sit next to the TP ones, on the same node when they fit), then
DP, then PP:  rank = ((pp_idx * dp + dp_idx) * cp + cp_idx) * tp + tp_idx.

The data-parallel group of a rank, over which gradients are reduced and ZeRO shards, is its DP
ranks and their CP ranks together (dp × cp, as in Megatron: the CP ranks hold parts of the same
sequences, whose gradients add up); which rows of a batch a rank reads is its DP coordinate alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from hpcllm.errors import UsageError


class Coords(NamedTuple):
    pp: int
    dp: int
    tp: int
    cp: int = 0


@dataclass(frozen=True)
class Layout:
    pp: int
    dp: int
    tp: int
    cp: int = 1

    @classmethod
    def for_world(cls, world: int, tp: int = 1, pp: int = 1, cp: int = 1) -> Layout:
        """dp = world / (tp * pp * cp); a world that does not factor is bad input (exit 2)."""
        for name, value in (("tp", tp), ("pp", pp), ("cp", cp)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        model = tp * pp * cp
        if world % model:
            named = f"tp*pp*cp = {tp}*{pp}*{cp}" if cp > 1 else f"tp*pp = {tp}*{pp}"
            flags = "--tp/--pp/--cp" if cp > 1 else "--tp/--pp"
            raise UsageError(
                f"world size {world} is not divisible by {named} = {model}; "
                f"launch a multiple of {model} ranks or change {flags}"
            )
        return cls(pp=pp, dp=world // model, tp=tp, cp=cp)

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def replicas(self) -> int:
        """The size of a data-parallel group: dp × cp ranks reduce gradients together."""
        return self.dp * self.cp

    def rank(self, pp: int, dp: int, tp: int, cp: int = 0) -> int:
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    def coords(self, rank: int) -> Coords:
        tp = rank % self.tp
        cp = (rank // self.tp) % self.cp
        dp = (rank // (self.tp * self.cp)) % self.dp
        pp = rank // (self.tp * self.cp * self.dp)
        return Coords(pp, dp, tp, cp)

    # The groups: ranks that share every coordinate but one, in order of that coordinate.
    def tp_group(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank(c.pp, c.dp, t, c.cp) for t in range(self.tp)]

    def dp_group(self, rank: int) -> list[int]:
        """Its DP ranks and their CP ranks (module docstring), in order of dp × cp + cp."""
        c = self.coords(rank)
        return [self.rank(c.pp, d, c.tp, k) for d in range(self.dp) for k in range(self.cp)]

    def pp_group(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank(p, c.dp, c.tp, c.cp) for p in range(self.pp)]

    def all_dp_groups(self) -> list[list[int]]:
        """Every DP group, in a fixed order (every rank must create Horovod process sets alike)."""
        return [self.dp_group(self.rank(p, 0, t)) for p in range(self.pp) for t in range(self.tp)]

    def all_tp_groups(self) -> list[list[int]]:
        return [
            self.tp_group(self.rank(p, d, 0, k))
            for p in range(self.pp)
            for d in range(self.dp)
            for k in range(self.cp)
        ]

    def all_pp_groups(self) -> list[list[int]]:
        return [
            self.pp_group(self.rank(0, d, t, k))
            for d in range(self.dp)
            for k in range(self.cp)
            for t in range(self.tp)
        ]

    def all_cp_groups(self) -> list[list[int]]:
        return [
            [self.rank(p, d, t, k) for k in range(self.cp)]
            for p in range(self.pp)
            for d in range(self.dp)
            for t in range(self.tp)
        ]

    def tp_groups_across_nodes(self, node_of_rank: list[int]) -> list[list[int]]:
        """The TP groups whose ranks are not all on one node (`node_of_rank`: every rank's node)."""
        return [g for g in self.all_tp_groups() if len({node_of_rank[r] for r in g}) > 1]

    def hybrid_dp_groups(self, node_of_rank: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        """Hybrid sharding (parallel.shard_group=node): every DP group cut into its ranks on each node
        (shard groups, in DP order) and the ranks at the same place of each node's part (replica
        groups). Every node must hold as many ranks of a DP group as the others."""
        shards: list[list[int]] = []
        replicas: list[list[int]] = []
        for group in self.all_dp_groups():
            by_node: dict[int, list[int]] = {}
            for rank in group:
                by_node.setdefault(node_of_rank[rank], []).append(rank)
            parts = list(by_node.values())
            if len({len(part) for part in parts}) != 1:
                raise ValueError(
                    f"the data-parallel group {group} has {[len(p) for p in parts]} ranks on its nodes"
                )
            shards += parts
            replicas += [list(column) for column in zip(*parts, strict=True)]
        return shards, replicas

    def __str__(self) -> str:
        context = f" x cp={self.cp}" if self.cp > 1 else ""
        return f"pp={self.pp} x dp={self.dp}{context} x tp={self.tp}"
