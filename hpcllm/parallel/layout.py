"""The pp × dp × tp layout: pure arithmetic of coordinates and groups (testable without MPI).

Rank order is Megatron's: TP varies fastest (tensor-parallel neighbours share a node and its fast
links), then DP, then PP:  rank = (pp_idx * dp + dp_idx) * tp + tp_idx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from hpcllm.errors import UsageError


class Coords(NamedTuple):
    pp: int
    dp: int
    tp: int


@dataclass(frozen=True)
class Layout:
    pp: int
    dp: int
    tp: int

    @classmethod
    def for_world(cls, world: int, tp: int = 1, pp: int = 1) -> Layout:
        """dp = world / (tp * pp); a world that does not factor is bad input (exit 2)."""
        for name, value in (("tp", tp), ("pp", pp)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if world % (tp * pp):
            raise UsageError(
                f"world size {world} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
                f"launch a multiple of {tp * pp} ranks or change --tp/--pp"
            )
        return cls(pp=pp, dp=world // (tp * pp), tp=tp)

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp

    def rank(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def coords(self, rank: int) -> Coords:
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp
        pp = rank // (self.tp * self.dp)
        return Coords(pp, dp, tp)

    # The groups: ranks that share every coordinate but one, in order of that coordinate.
    def tp_group(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank(c.pp, c.dp, t) for t in range(self.tp)]

    def dp_group(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank(c.pp, d, c.tp) for d in range(self.dp)]

    def pp_group(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank(p, c.dp, c.tp) for p in range(self.pp)]

    def all_dp_groups(self) -> list[list[int]]:
        """Every DP group, in a fixed order (every rank must create Horovod process sets alike)."""
        return [[self.rank(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def all_tp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def all_pp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

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
        return f"pp={self.pp} x dp={self.dp} x tp={self.tp}"
