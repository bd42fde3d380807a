"""The pp × dp × tp process grid: coordinates, sub-communicators and Horovod process sets.

Rank order is Megatron's: TP varies fastest (tensor-parallel neighbours share a node and its fast
links), then DP, then PP:  rank = (pp_idx * dp + dp_idx) * tp + tp_idx.

`Layout` is pure arithmetic (testable without MPI); `Grid` builds the communicators from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

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

    def __str__(self) -> str:
        return f"pp={self.pp} x dp={self.dp} x tp={self.tp}"


class Grid:
    """This rank's place in the layout, with one mpi4py communicator per axis.

    `dp_process_set` is the Horovod process set of this rank's DP group, created collectively on
    first use; gradient allreduce runs over it. `horovod` provides the initialised `horovod.torch`
    module when first needed (`lambda: runtime.horovod`), so a grid that never allreduces never
    starts Horovod.
    """

    def __init__(self, comm: Any, tp: int = 1, pp: int = 1, horovod: Callable[[], Any] | None = None):
        self.world = comm
        self.layout = Layout.for_world(comm.Get_size(), tp=tp, pp=pp)
        self.rank = comm.Get_rank()
        self.coords = self.layout.coords(self.rank)
        c = self.coords
        # Split colour: the coordinates the group shares; key: the one that varies, so the
        # sub-communicator's rank equals this rank's coordinate along its axis.
        self.tp_comm = comm.Split(color=c.pp * self.layout.dp + c.dp, key=c.tp)
        self.dp_comm = comm.Split(color=c.pp * self.layout.tp + c.tp, key=c.dp)
        self.pp_comm = comm.Split(color=c.dp * self.layout.tp + c.tp, key=c.pp)
        self._horovod = horovod
        self._process_sets: dict[str, list[Any]] = {}

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    @property
    def is_first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.layout.pp - 1

    def _process_set(self, axis: str) -> Any:
        """This rank's Horovod process set along `axis` (created collectively, every group, on first use)."""
        if self._horovod is None:
            raise RuntimeError("Grid was built without Horovod; pass horovod=lambda: runtime.horovod")
        hvd = self._horovod()
        groups = self.layout.all_dp_groups() if axis == "dp" else self.layout.all_tp_groups()
        if len(groups[0]) == self.layout.world:
            return hvd.global_process_set
        if axis not in self._process_sets:
            # Collective: every rank adds every group of the axis, in the same order.
            self._process_sets[axis] = [hvd.add_process_set(group) for group in groups]
        mine = next(i for i, group in enumerate(groups) if self.rank in group)
        return self._process_sets[axis][mine]

    @property
    def dp_process_set(self) -> Any:
        return self._process_set("dp")

    @property
    def tp_process_set(self) -> Any:
        return self._process_set("tp")

    def close(self) -> None:
        """Free the communicators and process sets (collective); the grid is unusable afterwards."""
        for sets in self._process_sets.values():
            hvd = self._horovod()  # type: ignore[misc]
            for process_set in sets:
                hvd.remove_process_set(process_set)
        self._process_sets = {}
        for sub in (self.tp_comm, self.dp_comm, self.pp_comm):
            sub.Free()

    def __repr__(self) -> str:
        return f"Grid({self.layout}, rank {self.rank} at {tuple(self.coords)})"
