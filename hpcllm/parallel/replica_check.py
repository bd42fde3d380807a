"""Data-parallel replicas hold bitwise the same parameters; a run whose replicas drifted apart (a
bit flip in memory, a non-deterministic kernel, a bug in a sharding strategy) stops before a
checkpoint can save the damage.

Each rank reduces every parameter it holds to a fingerprint of its bits, on the device: two
wrapping int64 sums of the bit patterns, one plain (any single flipped bit changes it by a power of
two) and one weighted by odd position numbers (two swapped values change it). The fingerprints
come to the host in one read, the DP group all-gathers them, and the verdict crosses the whole
world, so every rank stops alike. The cost is a pass over the parameters and two small collectives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hpcllm.errors import TrainingFailure

CHUNK = 1 << 22  # elements per pass: bounds the int64 temporaries
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ReplicaDrift(TrainingFailure):
    """Data-parallel replicas no longer hold the same parameters."""


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """[plain sum, position-weighted sum] of the tensor's bit patterns, int64, on its device."""
    flat = tensor.detach().contiguous().reshape(-1)
    bits = flat.view(BITS[flat.element_size()])
    sums = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), CHUNK):
        chunk = bits[start : start + CHUNK].to(torch.int64)
        odd = torch.arange(start, start + chunk.numel(), device=flat.device, dtype=torch.int64) * 2 + 1
        sums[0] += chunk.sum()
        sums[1] += (chunk * odd).sum()
    return sums


def fingerprints(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """One row per tensor, read to the host at once."""
    if not tensors:
        return np.zeros((0, 2), dtype=np.int64)
    return torch.stack([fingerprint(t) for t in tensors]).cpu().numpy()


def first_disagreement(names: Sequence[str], gathered: Sequence[tuple[int, np.ndarray]]) -> str | None:
    """The first parameter whose fingerprint differs across the replicas, and which ranks hold
    which bits (the majority against the others; with two replicas, one against the other)."""
    for index, name in enumerate(names):
        holders: dict[tuple[int, ...], list[int]] = {}
        for rank, rows in gathered:
            holders.setdefault(tuple(int(v) for v in rows[index]), []).append(rank)
        if len(holders) == 1:
            continue
        counts = Counter({value: len(ranks) for value, ranks in holders.items()})
        common = max(holders, key=lambda value: (counts[value], -min(holders[value])))
        others = sorted(rank for value, ranks in holders.items() if value != common for rank in ranks)
        return (
            f"data-parallel replicas differ in {name}: rank(s) {', '.join(map(str, others))} hold other "
            f"bits than rank(s) {', '.join(map(str, sorted(holders[common])))}"
        )
    return None


def check(named: Sequence[tuple[str, torch.Tensor]], dp_comm: Any, world: Any, rank: int, step: int) -> None:
    """Collective over the world: raise ReplicaDrift on every rank if any DP group's replicas differ."""
    message = None
    if dp_comm.Get_size() > 1:
        gathered = dp_comm.allgather((rank, fingerprints([t for _, t in named])))
        message = first_disagreement([n for n, _ in named], gathered)
    first = next((m for m in world.allgather(message) if m), None)
    if first is not None:
        raise ReplicaDrift(
            f"after step {step}, {first}; stopped before a checkpoint could save them: resume from "
            "the last checkpoint (--resume), and look for failing memory or a non-deterministic kernel "
            "if it recurs"
        )
