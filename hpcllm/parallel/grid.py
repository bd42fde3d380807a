"""The grid: this rank's place in the pp × dp × tp layout and every group it communicates in.

Like Megatron's `initialize_model_parallel`, every group is created eagerly, in one order, when the
grid is built, and on every rank alike: the mpi4py sub-communicators (tp, dp, pp and the two-rank
tied-embedding group of each pipeline), when Horovod is used, Horovod with all its process sets, and
when a `torch` backend is chosen, torch.distributed with a process group per TP and PP group.
Nothing is created later, so no collective setup can happen inside a forward pass (where a pipeline's
stages would wait on each other in different calls and deadlock).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hpcllm.parallel import horovod as horovod_start
from hpcllm.parallel import torch_dist
from hpcllm.parallel.layout import Coords, Layout

__all__ = ["Coords", "Grid", "Layout"]


class Grid:
    """Communicators for this rank. With `horovod=True` Horovod is started with a static process
    set for every DP group, and for every TP group too when `horovod_tp=True`."""

    def __init__(
        self,
        comm: Any,
        tp: int = 1,
        pp: int = 1,
        *,
        cp: int = 1,
        horovod: bool = False,
        horovod_tp: bool = False,
        horovod_env: Mapping[str, str] | None = None,
        horovod_controller: str = "mpi",
        torch_device: str | None = None,
        timeout_s: float = 300.0,
        shard_nodes: list[int] | None = None,
    ):
        """`torch_device`: start torch.distributed for this device type ("cuda": NCCL, "cpu": gloo).
        `horovod_controller`: mpi, gloo or auto (parallel.horovod.start).
        `shard_nodes` (every rank's node): hybrid sharding, the DP group cut by node into shard
        groups, with replica groups across the nodes (Layout.hybrid_dp_groups)."""
        from mpi4py import MPI

        self.world = comm
        self.layout = Layout.for_world(comm.Get_size(), tp=tp, pp=pp, cp=cp)
        self.rank = comm.Get_rank()
        self.coords = self.layout.coords(self.rank)
        c, layout = self.coords, self.layout
        # Split colour: the coordinates the group shares; key: the one that varies, so the
        # sub-communicator's rank equals this rank's coordinate along its axis.
        self.tp_comm = comm.Split(color=(c.pp * layout.dp + c.dp) * layout.cp + c.cp, key=c.tp)
        # The DP group reduces gradients: its DP ranks with their CP ranks (parallel.layout).
        self.dp_comm = comm.Split(color=c.pp * layout.tp + c.tp, key=c.dp * layout.cp + c.cp)
        self.pp_comm = comm.Split(color=(c.dp * layout.cp + c.cp) * layout.tp + c.tp, key=c.pp)
        self.cp_comm = comm.Split(color=(c.pp * layout.dp + c.dp) * layout.tp + c.tp, key=c.cp)
        # The ranks sharing this node's memory (a node-local leader copies staged data, say).
        self.node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        # The first and last stage of each pipeline both hold the tied embedding.
        holds_embedding = layout.pp > 1 and c.pp in (0, layout.pp - 1)
        embedding = self.pp_comm.Split(0 if holds_embedding else MPI.UNDEFINED, c.pp)
        self.embedding_comm: Any = embedding if holds_embedding else None
        # Hybrid sharding: the DP ranks of this node (fully sharded parameters are split over them).
        self.hybrid = shard_nodes is not None
        self.replica_index = 0  # which copy of the shares this rank holds (hybrid: its node's place)
        self.dp_shard_comm = self.dp_comm
        if shard_nodes is not None:
            _, replica_groups = layout.hybrid_dp_groups(shard_nodes)
            self.replica_index = next(g.index(self.rank) for g in replica_groups if self.rank in g)
            self.dp_shard_comm = self.dp_comm.Split(color=shard_nodes[self.rank], key=self.dp_rank)
        self.shard_nodes = shard_nodes
        self.timeout_s = timeout_s  # a stalled collective's limit (train.watchdog_s); Gloo's is twice it
        self.hvd: Any = None
        self.horovod_controller = ""  # the one Horovod runs on (mpi or gloo), once started
        self._sets: dict[str, Any] = {}
        if horovod:
            self._start_horovod(horovod_tp, dict(horovod_env or {}), horovod_controller)
        # torch.distributed addresses point-to-point peers by world rank.
        self.pp_world_ranks: list[int] = self.pp_comm.allgather(self.rank)
        self.cp_world_ranks: list[int] = self.cp_comm.allgather(self.rank)
        self.torch_groups: dict[str, Any] = {}
        if torch_device is not None:
            self.torch_groups = torch_dist.start(comm, torch_device, self._torch_axes(), timeout_s)

    def _torch_axes(self) -> dict[str, list[list[int]]]:
        """The groups torch.distributed needs, by axis (every rank builds all of them)."""
        layout = self.layout
        axes = {"tp": layout.all_tp_groups(), "pp": layout.all_pp_groups()}
        if layout.pp > 1:  # the first and last stage of each pipeline (the tied embedding)
            axes["embedding"] = [[group[0], group[-1]] for group in layout.all_pp_groups()]
        if layout.cp > 1:
            axes["cp"] = layout.all_cp_groups()
        return axes

    def _start_horovod(self, with_tp: bool, env: dict[str, str], controller: str) -> None:
        axes = {"dp": self.layout.all_dp_groups()}
        if self.shard_nodes is not None:
            axes["dp_shard"], axes["dp_replica"] = self.layout.hybrid_dp_groups(self.shard_nodes)
        if with_tp:
            axes["tp"] = self.layout.all_tp_groups()
        # A group of one rank needs no set; a group of every rank is Horovod's global set.
        partial = {axis: groups for axis, groups in axes.items() if 1 < len(groups[0]) < self.layout.world}
        ordered = [group for groups in partial.values() for group in groups]
        unique = list(dict.fromkeys(tuple(g) for g in ordered))
        self.hvd, sets, self.horovod_controller = horovod_start.start(
            self.world, [list(g) for g in unique], env, controller, 2 * self.timeout_s
        )
        by_ranks = dict(zip(unique, sets, strict=True))
        for axis, groups in axes.items():
            mine = next(g for g in groups if self.rank in g)
            if len(mine) == self.layout.world:
                self._sets[axis] = self.hvd.global_process_set
            elif len(mine) > 1:  # a one-rank group communicates with nobody: it has no set
                self._sets[axis] = by_ranks[tuple(mine)]

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def dp_rank(self) -> int:
        """This rank's place in its DP group (dp × cp ranks: parallel.layout)."""
        return self.coords.dp * self.layout.cp + self.coords.cp

    @property
    def data_rank(self) -> int:
        """Which of the layout.dp parts of a global batch this rank reads (its CP ranks read it too)."""
        return self.coords.dp

    @property
    def cp_rank(self) -> int:
        return self.coords.cp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    @property
    def is_first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.layout.pp - 1

    def process_set(self, axis: str) -> Any:
        """This rank's Horovod process set along `axis` ("dp", or "tp" when started with horovod_tp)."""
        if axis not in self._sets:
            raise RuntimeError(f"the grid was built without Horovod process sets for {axis}")
        return self._sets[axis]

    @property
    def dp_process_set(self) -> Any:
        return self.process_set("dp")

    @property
    def tp_process_set(self) -> Any:
        return self.process_set("tp")

    @property
    def dp_shard(self) -> tuple[int, int, Any]:
        """(this rank's place, size, Horovod set) of the group fully sharded parameters are split
        over: the DP group, or with hybrid sharding its ranks on this node."""
        if not self.hybrid:
            return self.dp_rank, self.layout.replicas, self._sets.get("dp")
        return self.dp_shard_comm.Get_rank(), self.dp_shard_comm.Get_size(), self._sets.get("dp_shard")

    @property
    def dp_replicas(self) -> tuple[int, Any]:
        """With hybrid sharding: (this rank's node among the replicas, the Horovod set of the ranks
        holding the same shares on the other nodes, or None on one node); else (0, None)."""
        return self.replica_index, self._sets.get("dp_replica") if self.hybrid else None

    def close(self) -> None:
        """Free the communicators and stop Horovod (collective); the grid is unusable afterwards."""
        if self.hvd is not None:
            self.hvd.shutdown()
            self.hvd, self._sets = None, {}
        self.torch_groups = {}  # torch.distributed itself stays up: it starts once per process
        shard = self.dp_shard_comm if self.hybrid else None
        subs = (
            self.tp_comm,
            self.dp_comm,
            self.pp_comm,
            self.cp_comm,
            self.node_comm,
            self.embedding_comm,
            shard,
        )
        for sub in subs:
            if sub is not None:
                sub.Free()

    def __repr__(self) -> str:
        return f"Grid({self.layout}, rank {self.rank} at {tuple(self.coords)})"
