"""How each parameter is partitioned, declared by the layer that creates it.

A layer that splits its parameters says so in `parameter_sharding()` (names local to the layer);
`model_sharding(model)` collects the declarations under full parameter names, and a parameter no
layer declares is replicated. Gradient clipping, checkpoint save and checkpoint resharding read
only these declarations: nothing is inferred from a parameter's name.

    Sharding(dim=0)                      rows split contiguously (column-parallel Linear)
    Sharding(dim=1)                      columns split (row-parallel Linear's weight)
    Sharding(dim=0, blocks=3)            q, k and v stacked on dim 0, each split alike (by head)
    Sharding(dim=0, blocks=(8, 2, 2))    blocks of unequal sizes (grouped-query q, k, v), each split alike
    Sharding(dim=0, full_size=V)         rows padded with zeros to a multiple of tp (the vocabulary)
    Sharding(pipeline_copy=True)         a second copy held by another pipeline stage (tied weights)
    Sharding(sequence_parallel=True)     replicated, but applied to this rank's part of the sequence:
                                         its gradient is partial and is summed over TP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class Sharding:
    dim: int | None = None  # the tensor-parallel split dimension; None = the same on every TP rank
    # The split dimension stacks blocks, each split alike: this many equal ones, or their sizes.
    blocks: int | tuple[int, ...] = 1
    full_size: int = 0  # for a padded split: the real length of `dim` (the rest is zero padding)
    pipeline_copy: bool = False  # another stage holds the same tensor: count it once
    sequence_parallel: bool = False  # replicated, gradient partial over TP (sequence parallelism)

    @property
    def partitioned(self) -> bool:
        return self.dim is not None

    def block_sizes(self, length: int) -> list[int]:
        """The sizes of the stacked blocks along a split dimension of `length`."""
        if isinstance(self.blocks, int):
            return [length // self.blocks] * self.blocks
        total = sum(self.blocks)  # `length` is the whole tensor's, or a slice's: 1/tp of every block
        return [size * length // total for size in self.blocks]

    def to_json(self) -> dict[str, Any]:
        blocks = self.blocks if isinstance(self.blocks, int) else list(self.blocks)
        return {"dim": self.dim, "blocks": blocks, "full_size": self.full_size}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sharding:
        blocks = data["blocks"] if isinstance(data["blocks"], int) else tuple(data["blocks"])
        return cls(dim=data["dim"], blocks=blocks, full_size=data["full_size"])


REPLICATED = Sharding()


@runtime_checkable
class DeclaresSharding(Protocol):
    def parameter_sharding(self) -> dict[str, Sharding]:
        """Sharding of this module's own parameters, by their local names."""
        ...


def model_sharding(model: nn.Module) -> dict[str, Sharding]:
    """Every parameter's sharding by full name. A parent may mark a child's parameter as a pipeline
    copy (the tied embedding on the last stage); the split itself comes from the child layer."""
    declared: dict[str, Sharding] = {}
    for prefix, module in model.named_modules():  # parents come before their children
        if not isinstance(module, DeclaresSharding):
            continue
        for local, sharding in module.parameter_sharding().items():
            name = f"{prefix}.{local}" if prefix else local
            earlier = declared.get(name)
            if earlier is not None:
                sharding = replace(
                    sharding,
                    pipeline_copy=sharding.pipeline_copy or earlier.pipeline_copy,
                    sequence_parallel=sharding.sequence_parallel or earlier.sequence_parallel,
                )
            declared[name] = sharding
    return {name: declared.get(name, REPLICATED) for name, _ in model.named_parameters()}


def sequence_parallel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters declared sequence-parallel: their gradients must be summed over TP."""
    sharding = model_sharding(model)
    return [param for name, param in model.named_parameters() if sharding[name].sequence_parallel]


def padded_size(size: int, tp: int) -> int:
    return math.ceil(size / tp) * tp


def shard(full: torch.Tensor, sharding: Sharding, rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of the full tensor (a copy). Scalars (Adam's step) are replicated."""
    if not sharding.partitioned or full.dim() == 0:
        return full.detach().clone()
    dim = sharding.dim
    assert dim is not None
    tensor = full.detach()
    if sharding.full_size:
        rows = padded_size(sharding.full_size, tp)
        padding = [0, 0] * (tensor.dim() - 1 - dim) + [0, rows - tensor.shape[dim]]
        tensor = torch.nn.functional.pad(tensor, padding)
    if sharding.blocks != 1:
        blocks = tensor.split(sharding.block_sizes(tensor.shape[dim]), dim=dim)
        return torch.cat([block.chunk(tp, dim=dim)[rank] for block in blocks], dim=dim).clone()
    return tensor.chunk(tp, dim=dim)[rank].clone()


def unshard(slices: list[torch.Tensor], sharding: Sharding) -> torch.Tensor:
    """The full tensor from every TP rank's slice, in rank order (the inverse of `shard`)."""
    if not sharding.partitioned or slices[0].dim() == 0:
        return slices[0]
    dim = sharding.dim
    assert dim is not None
    if sharding.blocks != 1:
        per_rank = [s.split(sharding.block_sizes(s.shape[dim]), dim=dim) for s in slices]
        full = torch.cat([torch.cat(parts, dim=dim) for parts in zip(*per_rank, strict=True)], dim=dim)
    else:
        full = torch.cat(slices, dim=dim)
    if sharding.full_size:
        full = full.narrow(dim, 0, sharding.full_size)
    return full
