"""Splitting the layer stack into pipeline stages: contiguous, every stage at least one layer,
balanced by a weight per layer or as `parallel.stage_layers` says. Pure arithmetic (no MPI, no model)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcllm.errors import UsageError


def balanced_stages(block_params: list[int], first_extra: int, last_extra: int, pp: int) -> list[int]:
    """Layers per stage minimising the heaviest stage (contiguous, every stage at least one layer)."""
    n = len(block_params)
    if pp > n:
        raise UsageError(f"pp = {pp} stages but only {n} layers: every stage needs a layer; lower --pp")
    prefix = np.concatenate([[0], np.cumsum(block_params)])

    def weight(start: int, end: int, stage: int) -> int:
        w = int(prefix[end] - prefix[start])
        return w + (first_extra if stage == 0 else 0) + (last_extra if stage == pp - 1 else 0)

    # best[s][i]: the lightest heaviest-stage for putting layers [0, i) into stages [0, s].
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp)]
    cut: list[list[int]] = [[0] * (n + 1) for _ in range(pp)]
    for i in range(1, n + 1):
        best[0][i] = weight(0, i, 0)
    for s in range(1, pp):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                candidate = max(best[s - 1][j], weight(j, i, s))
                if candidate < best[s][i]:
                    best[s][i], cut[s][i] = candidate, j
    counts, end = [], n
    for s in range(pp - 1, 0, -1):
        start = cut[s][end]
        counts.append(end - start)
        end = start
    counts.append(end)
    return counts[::-1]


def parse_stage_layers(text: str, n_layer: int, pp: int) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise UsageError(f"parallel.stage_layers must be comma-separated layer counts, not {text!r}") from exc
    if len(counts) != pp or sum(counts) != n_layer or min(counts) < 1:
        raise UsageError(
            f"parallel.stage_layers {text!r} must give {pp} positive counts summing to n_layer = {n_layer}"
        )
    return counts


@dataclass(frozen=True)
class StagePlan:
    layers_per_stage: list[int]

    def layer_range(self, stage: int) -> range:
        start = sum(self.layers_per_stage[:stage])
        return range(start, start + self.layers_per_stage[stage])
