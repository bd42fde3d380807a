"""The keys and values of every position decoded so far, per layer, for generation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Buffers allocated once for the whole window: [batch, heads (this rank's), capacity, head_dim]
    per layer, keyed by the layer's global index."""

    capacity: int
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    length: dict[int, int] = field(default_factory=dict)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys and values; all of them so far come back."""
        if layer not in self.keys:
            batch, heads, _, dim = k.shape
            self.keys[layer] = k.new_empty((batch, heads, self.capacity, dim))
            self.values[layer] = v.new_empty((batch, heads, self.capacity, dim))
            self.length[layer] = 0
        start, end = self.length[layer], self.length[layer] + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.length[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
