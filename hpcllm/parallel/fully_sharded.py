"""Fully sharded data parallelism (parallel.zero = 3): every data-parallel rank keeps 1/dp of each
parameter, its gradient and its Adam state; a unit's whole parameters exist only while it computes.

The model is cut into units (`GPT.shard_units`: the token embedding, the positions, each block, the
head). A unit's parameters are views into one flat fp32 buffer, padded to a multiple of dp, whose
storage is empty while the unit is released; rank r keeps share r of it in `param_shard` (all
units' shares concatenated), which the optimizer updates in place. The model calls the gate
(`before`/`after`, the `UnitGate` of hpcllm.model.gpt) around each unit:

  forward    before: the unit's allgather is completed (it was usually started ahead), and the
             next unit's allgather is started (prefetch); after: a block is released at once, the
             embedding and head stay whole until their backward (they are used again at the end
             of the forward and the start of the backward); a hook is put on the output;
  backward   the output's hook runs before the unit's backward: the unit is gathered again (with
             full recomputation: before the recompute) and the previous unit's gather is started;
             when the last of its parameters' gradients has been accumulated, the unit's gradients
             are flattened, reduce-scattered (Horovod's Average over the DP set) into this rank's
             gradient shard `shard`, and the unit is released.

Hybrid sharding (parallel.shard_group = node, HSDP): the units are sharded over the DP ranks of one
node, so that the gathers and reduce-scatters stay on the node's links, and the reduced shares are
averaged over the nodes' copies (one allreduce of the shares per step, across nodes).

With parallel.reduce_every = N > 1 the gradients of N micro-batches are accumulated whole (autograd's
`.grad`, per unit) and reduce-scattered once: 1/N of the traffic, at the memory of whole gradients
between micro-batches; the default reduce-scatters every micro-batch (docs/memory.md).

Gradients summed over another group (the sequence-parallel norms over TP, the tied embedding over the
first and last stage) are summed on this rank's shares after the DP reduction (`late_piece`): the
layout of a unit is the same on the ranks of those groups, so their shares line up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hpcllm.cluster import watchdog

UnitValues = Callable[[str], dict[str, torch.Tensor]]  # a unit's key -> its whole parameters by name
REDUCTIONS_IN_FLIGHT = 2  # gradient reduce-scatters outstanding at once: each holds a unit's gradients


@dataclass(eq=False)
class Unit:
    key: str
    index: int
    params: list[nn.Parameter]
    start: int  # offset of its flat buffer in the concatenated layout of every unit
    length: int  # padded to a multiple of dp
    full: torch.Tensor  # the flat parameters; storage empty while released
    keep_after_forward: bool  # whole from its forward to its backward (embedding, head)
    gathered: bool = True
    gather: Any = None  # Horovod's handle of its allgather in flight
    waiting_for: int = 0  # gradients still to arrive in this backward pass
    passes: int = 0  # backward passes accumulated since its last reduce-scatter
    offsets: dict[int, tuple[int, int]] = field(default_factory=dict)  # id(param) -> range in `full`

    def share(self, rank: int, dp: int) -> tuple[int, int]:
        """The range of the concatenated layout that rank `rank` keeps."""
        size = self.length // dp
        return self.start + rank * size, self.start + (rank + 1) * size


class FullyShardedUnits:
    """The units of one model partition, sharded over the DP process set (see the module docstring).
    Offers the layout the distributed optimizer reads (`shares`, `offsets`, `shard`)."""

    def __init__(
        self,
        units: Sequence[tuple[str, Sequence[nn.Module]]],
        model: nn.Module,
        dp: int,
        dp_rank: int,
        hvd: Any,
        process_set: Any,
        every: int = 1,
        values: UnitValues | None = None,
        device: torch.device | None = None,
        replicas: Any = None,
    ):
        """`values(key)`: the unit's whole parameters by full name, for a model built on the meta
        device (nothing allocated): each unit is made, cut into this rank's share and released
        before the next, so the whole partition never exists. Without it, the model's values.
        `replicas`: hybrid sharding's Horovod set of the ranks holding the same shares on the other
        nodes, over which the reduced gradient shares are averaged."""
        self.dp, self.dp_rank, self.hvd, self.process_set, self.every = dp, dp_rank, hvd, process_set, every
        self.replicas = replicas
        self.units = self._lay_out(units, model)
        self.device = device or torch.device("cpu")
        total = sum(unit.length for unit in self.units) // dp
        self.param_shard = torch.zeros(total, dtype=torch.float32, device=self.device)
        self.shard = torch.zeros_like(self.param_shard)  # this rank's reduced gradients
        self.offsets: dict[int, tuple[int, int]] = {}  # id(param) -> its range in the concatenated layout
        names = {id(p): n for n, p in model.named_parameters()}
        for unit in self.units:
            self._fill(unit, model, names, values(unit.key) if values is not None else None)
        self.by_key = {unit.key: unit for unit in self.units}
        self.position = {unit.key: i for i, unit in enumerate(self.units)}  # forward order, for prefetch
        self.owned = self._owned()  # the layout is fixed from here on
        self.late_pieces = {id(param): piece for param, piece in self.shard_pieces()}
        self.pending: deque[tuple[Unit, Any, torch.Tensor]] = deque()
        self.peak_gathered_bytes = 0

    def _lay_out(self, units: Sequence[tuple[str, Sequence[nn.Module]]], model: nn.Module) -> list[Unit]:
        """Each unit's parameters (every one in exactly one unit) and its place in the layout."""
        seen: set[int] = set()
        laid_out, start = [], 0
        for index, (key, modules) in enumerate(units):
            params = []
            for param in (p for module in modules for p in module.parameters()):
                if id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
            if params:
                length = -(-sum(p.numel() for p in params) // self.dp) * self.dp
                empty = torch.empty(0)
                laid_out.append(Unit(key, index, params, start, length, empty, not key.startswith("block")))
                start += length
        missing = [name for name, p in model.named_parameters() if id(p) not in seen]
        if missing:
            raise ValueError(f"parameters in no fully sharded unit: {missing[:3]}")
        return laid_out

    @torch.no_grad()
    def _fill(
        self,
        unit: Unit,
        model: nn.Module,
        names: dict[int, str],
        source: dict[str, torch.Tensor] | None,
    ) -> None:
        """The unit's flat buffer from its values; the parameters become views of it (a meta one is
        replaced by a new Parameter); its share is kept and the buffer released."""
        unit.full = torch.zeros(unit.length, dtype=torch.float32, device=self.device)
        offset = 0
        for i, param in enumerate(unit.params):
            end = offset + param.numel()
            value = source[names[id(param)]] if source is not None else param.detach()
            unit.full[offset:end].copy_(value.reshape(-1))
            if param.is_meta:  # a new Parameter on the device, holding nothing yet
                owner_name, _, attribute = names[id(param)].rpartition(".")
                replacement = nn.Parameter(torch.empty(0, device=self.device), param.requires_grad)
                setattr(model.get_submodule(owner_name), attribute, replacement)
                names[id(replacement)] = names[id(param)]
                unit.params[i] = param = replacement
            # `.data`, not a Parameter made of the view: the parameter keeps its own version counter,
            # so refilling the buffer (a gather) does not look to autograd like an in-place change.
            param.data = unit.full[offset:end].view(value.shape)
            unit.offsets[id(param)] = (offset, end)
            self.offsets[id(param)] = (unit.start + offset, unit.start + end)
            param.register_post_accumulate_grad_hook(self._gradient_arrived(unit))
            offset = end
        unit.waiting_for = len(unit.params)
        lo, hi = unit.share(self.dp_rank, self.dp)
        self._shard_of(self.param_shard, unit).copy_(unit.full[lo - unit.start : hi - unit.start])
        self._release(unit)

    def _shard_of(self, tensor: torch.Tensor, unit: Unit) -> torch.Tensor:
        """A unit's share in a tensor laid out like the shards (`param_shard`, `shard`)."""
        first = unit.start // self.dp
        return tensor[first : first + unit.length // self.dp]

    # ---- the layout the distributed optimizer reads -------------------------------------------

    def shares(self) -> list[tuple[int, int]]:
        return [unit.share(self.dp_rank, self.dp) for unit in self.units]

    def _owned(self) -> list[tuple[nn.Parameter, int, int, int]]:
        """(parameter, where its share starts in the shards, the elements [a, b) of the flattened
        parameter it holds) for each parameter this rank keeps a part of."""
        owned = []
        for unit in self.units:
            lo, hi = unit.share(self.dp_rank, self.dp)
            for param in unit.params:
                start, end = self.offsets[id(param)]
                first, last = max(start, lo), min(end, hi)
                if first < last:
                    owned.append((param, unit.start // self.dp + first - lo, first - start, last - start))
        return owned

    def shard_pieces(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, the slice of `shard` holding its reduced gradient) for each parameter this
        rank keeps a part of (views: valid at every step)."""
        return [(param, self.shard[at : at + b - a]) for param, at, a, b in self.owned]

    @torch.no_grad()
    def load_parameters(self, state: dict[str, torch.Tensor], names: dict[int, str]) -> None:
        """This rank's shares from whole parameters (`state`: NAME -> tensor of this partition;
        `names`: id(parameter) -> NAME)."""
        for param, at, a, b in self.owned:
            if names[id(param)] in state:  # a partial state (one unit at a time) leaves the rest
                self.param_shard[at : at + b - a].copy_(state[names[id(param)]].reshape(-1)[a:b])
        self.release_all()  # whole copies gathered before hold the old values

    def unit_parameters(self) -> list[list[nn.Parameter]]:
        """Each unit's parameters, in the forward's order."""
        return [list(unit.params) for unit in self.units]

    def late_piece(self, param: nn.Parameter) -> torch.Tensor | None:
        """The slice of the reduced gradient shard holding `param`'s share, or None."""
        return self.late_pieces.get(id(param))

    # ---- the gate the model calls -------------------------------------------------------------

    def before(self, *keys: str) -> None:
        """Before units compute: gathered, and the next one's gather started."""
        units = [self.by_key[key] for key in keys if key in self.by_key]
        for unit in units:
            self._ensure(unit)
        if units:  # the unit after the last one named
            self._prefetch(units[-1], +1)

    def after(self, output: torch.Tensor, *keys: str) -> torch.Tensor:
        """After units computed `output`: blocks released; a hook gathers them before their backward."""
        units = [self.by_key[key] for key in keys if key in self.by_key]
        backward = torch.is_grad_enabled() and output.requires_grad
        if backward and units:
            output.register_hook(self._before_backward(units))
        for unit in units:
            if not (backward and unit.keep_after_forward):
                self._release(unit)
        return output

    def _before_backward(self, units: list[Unit]) -> Callable[[torch.Tensor], None]:
        def gather(_: torch.Tensor) -> None:
            for unit in units:
                self._ensure(unit)
            self._prefetch(units[0], -1)  # the unit before the first one named

        return gather

    def _prefetch(self, anchor: Unit, direction: int) -> None:
        position = self.position[anchor.key] + direction
        if 0 <= position < len(self.units):
            unit = self.units[position]
            if not unit.gathered and unit.gather is None:
                self._start_gather(unit)

    # ---- gathering and releasing parameters ---------------------------------------------------

    def _start_gather(self, unit: Unit) -> None:
        unit.full.untyped_storage().resize_(unit.length * unit.full.element_size())
        self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes())
        share = self._shard_of(self.param_shard, unit)  # not written before the gather completes
        name = f"hpcllm.fsdp.params.{unit.index}"
        unit.gather = self.hvd.allgather_async(share, name=name, process_set=self.process_set)

    def _ensure(self, unit: Unit) -> None:
        if unit.gathered:
            return
        if unit.gather is None:
            self._start_gather(unit)
        with watchdog.waiting("allgather of a fully sharded unit's parameters"):
            unit.full.copy_(self.hvd.synchronize(unit.gather))
        unit.gather, unit.gathered = None, True

    def _release(self, unit: Unit) -> None:
        if unit.gather is not None:  # a prefetch not used: completed, so every rank agrees
            self._ensure(unit)
        unit.full.untyped_storage().resize_(0)
        unit.gathered = False

    def gathered_bytes(self) -> int:
        """Bytes of whole parameters this rank holds now (the units gathered or being gathered)."""
        return sum(unit.full.untyped_storage().nbytes() for unit in self.units)

    def memory_figures(self) -> dict[str, int]:
        """Bytes of parameter storage: this rank's shares, the whole partition, the units kept from
        forward to backward, the largest block, and the most whole parameters held at once so far
        (counted from the live storage)."""
        blocks = [unit.length * 4 for unit in self.units if not unit.keep_after_forward]
        return {
            "parameter_share_bytes": self.param_shard.numel() * self.param_shard.element_size(),
            "partition_bytes": sum(unit.length for unit in self.units) * 4,
            "kept_units_bytes": sum(unit.length * 4 for unit in self.units if unit.keep_after_forward),
            "largest_block_bytes": max(blocks, default=0),
            "peak_whole_parameter_bytes": self.peak_gathered_bytes,
        }

    def release_all(self) -> None:
        for unit in self.units:
            self._release(unit)

    # ---- gradients ----------------------------------------------------------------------------

    def _gradient_arrived(self, unit: Unit) -> Callable[[torch.Tensor], None]:
        def arrived(_: torch.Tensor) -> None:
            unit.waiting_for -= 1
            if unit.waiting_for:
                return
            unit.waiting_for = len(unit.params)
            unit.passes += 1
            if unit.passes == self.every:
                self._reduce(unit)
            self._release(unit)

        return arrived

    def _reduce(self, unit: Unit) -> None:
        """Start the reduce-scatter of the unit's accumulated gradients (the `.grad`s are dropped)."""
        flat = torch.zeros(unit.length, dtype=torch.float32, device=unit.full.device)
        for param in unit.params:
            start, end = unit.offsets[id(param)]
            if param.grad is not None:
                flat[start:end].copy_(param.grad.reshape(-1))
            param.grad = None
        unit.passes = 0
        name = f"hpcllm.fsdp.grads.{unit.index}"
        handle = self.hvd.reducescatter_async(
            flat, name=name, op=self.hvd.Average, process_set=self.process_set
        )
        self.pending.append((unit, handle, flat))
        if len(self.pending) > REDUCTIONS_IN_FLIGHT:
            self._land_reduction(*self.pending.popleft())

    def _land_reduction(self, unit: Unit, handle: Any, sent: torch.Tensor) -> None:
        with watchdog.waiting("reduce-scatter of a fully sharded unit's gradients"):
            self._shard_of(self.shard, unit).add_(self.hvd.synchronize(handle))
        del sent  # kept alive until Horovod was done with it

    def zero_(self) -> None:
        """Before a step's first backward."""
        self.wait()
        self.shard.zero_()
        for unit in self.units:
            unit.passes, unit.waiting_for = 0, len(unit.params)
            for param in unit.params:
                param.grad = None
        self.release_all()

    def wait(self) -> None:
        while self.pending:
            self._land_reduction(*self.pending.popleft())

    def finish(self, sum_late: Callable[[], None]) -> None:
        """After the step's last backward: what is left reduced, every reduction landed, the late
        sums over other groups made on the shares, and every unit released."""
        for unit in self.units:
            if unit.passes:
                self._reduce(unit)
        self.wait()
        if self.replicas is not None:  # hybrid: the other nodes' averages of the same shares
            with watchdog.waiting("allreduce of the gradient shares across nodes (hybrid sharding)"):
                self.hvd.allreduce_(
                    self.shard, name="hpcllm.fsdp.replicas", op=self.hvd.Average, process_set=self.replicas
                )
        sum_late()
        self.release_all()


def units_of(model: nn.Module) -> FullyShardedUnits | None:
    """The units holding the model's parameters when they are fully sharded, else None."""
    gate = getattr(model, "gate", None)
    return gate if isinstance(gate, FullyShardedUnits) else None


def whole_bytes(units: Sequence[tuple[str, Sequence[nn.Module]]]) -> tuple[int, int]:
    """(bytes of the units kept whole from forward to backward, bytes of the largest block): what
    zero = 3 holds whole at once is the first plus two of the second (weights), plus one block's
    gradients while they are flattened for their reduce-scatter."""
    sizes = {key: 4 * sum(p.numel() for m in modules for p in m.parameters()) for key, modules in units}
    blocks = [size for key, size in sizes.items() if key.startswith("block")]
    return sum(size for key, size in sizes.items() if not key.startswith("block")), max(blocks, default=0)
