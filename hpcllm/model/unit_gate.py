"""The seam between a model and fully sharded parameters."""

from __future__ import annotations

import torch


class UnitGate:
    """What a model calls around each of its units (`GPT.shard_units`) when its parameters are
    fully sharded (hpcllm.parallel.fully_sharded): `before` gathers them, `after` may release
    them and arranges their gathering before the unit's backward. By default, nothing."""

    def before(self, *units: str) -> None:
        pass

    def after(self, output: torch.Tensor, *units: str) -> torch.Tensor:
        return output


NO_GATE = UnitGate()
