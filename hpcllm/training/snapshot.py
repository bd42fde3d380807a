"""What goes into a checkpoint's files: one model partition's state copied to the host at a step
boundary (`ShardSnapshot`), and the files' names. Taking a snapshot needs no communication: the
first DP replica of each (pp, tp) partition snapshots its weights, optimizer state and RNG state;
with a sharded optimizer every DP rank snapshots its own shares of the Adam state as well, and
fully sharded (zero = 3) its shares of the parameters, which then are in no other file.
Writing them is training.checkpoint's (in the background with train.async_checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hpcllm.parallel.fully_sharded import units_of
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.sharding import model_sharding
from hpcllm.training import optimizer_state


def shard_name(pp_rank: int, tp_rank: int) -> str:
    return f"shard-pp{pp_rank}-tp{tp_rank}"


def part_name(pp_rank: int, tp_rank: int, dp_rank: int) -> str:
    """A sharded optimizer's state of one DP rank, for the partition `shard_name` names."""
    return f"{shard_name(pp_rank, tp_rank)}-dp{dp_rank}"


@dataclass
class ShardSnapshot:
    """One model partition's state, copied to host memory at a step boundary: what its shard
    file and side file will hold, independent of the training that goes on."""

    base: str  # shard-ppP-tpT
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _on_host(tensor: torch.Tensor, copy: bool) -> torch.Tensor:
    """The tensor on the host: a copy that later steps cannot change, or (copy=False, for a write
    that finishes before training goes on) the tensor itself when it is already there."""
    return tensor.detach().to("cpu", copy=copy).contiguous()


def snapshot_shard(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, grid: Grid, copy: bool = True
) -> ShardSnapshot:
    """This partition's model, optimizer state and RNG state, copied to the host."""
    names = {p: n for n, p in model.named_parameters()}
    # Fully sharded, no rank holds a whole parameter: each DP rank's part file carries its shares.
    in_parts = set(names.values()) if units_of(model) is not None else set()
    state = model.state_dict()
    tensors = {f"model.{k}": _on_host(v, copy) for k, v in state.items() if k not in in_parts}
    optim_tensors, groups = optimizer_state.to_tensors(optimizer, names)
    tensors.update({name: _on_host(t, copy) for name, t in optim_tensors.items()})
    # Training draws no random numbers (dropout masks are keyed, model.dropout); the generators are
    # kept so that anything else drawn from them continues alike after a resume.
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    split = {name: s.to_json() for name, s in model_sharding(model).items() if s.partitioned}
    meta = {"optimizer_groups": groups, "coords": list(grid.coords), "sharding": split}
    if hasattr(optimizer, "state_parts"):  # its state is in the DP ranks' part files
        meta["optimizer_parts"] = optimizer.parts[1]
    if in_parts:  # and so are the parameters
        meta["parameter_parts"] = True
    return ShardSnapshot(shard_name(grid.pp_rank, grid.tp_rank), tensors, meta)


def take_snapshot(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, grid: Grid, copy: bool = True
) -> list[ShardSnapshot]:
    """What this rank writes: the partition's shard on its first replica; with a sharded optimizer,
    also every DP rank's own shares of its state (no gather: a state never comes together on one
    rank, and no communication)."""
    out = [snapshot_shard(model, optimizer, grid, copy)] if grid.dp_rank == 0 else []
    if hasattr(optimizer, "state_parts") and grid.replica_index == 0:  # hybrid: one node's copy
        tensors, meta = optimizer.state_parts({p: n for n, p in model.named_parameters()})
        base = part_name(grid.pp_rank, grid.tp_rank, optimizer.parts[0])
        out.append(ShardSnapshot(base, {k: _on_host(t, copy) for k, t in tensors.items()}, meta))
    return out
