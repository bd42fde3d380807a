"""Where a training step's time goes: wall time per phase (data, forward, backward, allreduce wait,
optimizer), summed over a logging interval and reported in milliseconds per step.

On a GPU the phases would otherwise only measure kernel launches, so the timer synchronises the
device at each boundary; that costs a few microseconds per phase, not a pipeline stall per kernel.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def device_sync(device: torch.device) -> Callable[[], None] | None:
    """The synchronise call the timer needs on `device` (None on CPU, where ops are synchronous)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


class PhaseTimer:
    def __init__(self, sync: Callable[[], None] | None = None):
        self._sync = sync
        self._seconds: dict[str, float] = defaultdict(float)
        self._steps = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._sync is not None:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self._seconds[name] += time.perf_counter() - start

    def step_done(self) -> None:
        self._steps += 1

    def take_ms_per_step(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase since the last call; starts a new interval."""
        steps = max(1, self._steps)
        result = {name: 1000 * seconds / steps for name, seconds in self._seconds.items()}
        self._seconds.clear()
        self._steps = 0
        return result
