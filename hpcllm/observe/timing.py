"""Where a training step's time goes: time per phase (data, forward, backward, allreduce wait,
optimizer), summed over a logging interval and reported in milliseconds per step; and the phases
of a one-off job (PhaseClock).

On CPU, wall time between the phase's boundaries. On a GPU the host only launches kernels, so each
boundary records a CUDA event on the current stream instead, and the events are read when the
interval is reported: one synchronisation per logging interval, none per phase.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class PhaseTimer:
    def __init__(self, device: torch.device | None = None):
        self._cuda = device is not None and device.type == "cuda"
        if self._cuda:  # imported here: a job without a GPU (prepare's PhaseClock) must not pay for torch
            import torch

            self._event = torch.cuda.Event
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, Any, Any]] = []  # CUDA: (phase, start event, end event)
        self._steps = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._cuda:
            start_event = self._event(enable_timing=True)
            start_event.record()
            try:
                yield
            finally:
                end_event = self._event(enable_timing=True)
                end_event.record()
                self._events.append((name, start_event, end_event))
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] += time.perf_counter() - start

    def step_done(self) -> None:
        self._steps += 1

    def take_ms_per_step(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase since the last call; starts a new interval."""
        if self._events:
            self._events[-1][2].synchronize()  # the last event done: every earlier one is too
            for name, start_event, end_event in self._events:
                self._seconds[name] += start_event.elapsed_time(end_event) / 1000
            self._events.clear()
        steps = max(1, self._steps)
        result = {name: 1000 * seconds / steps for name, seconds in self._seconds.items()}
        self._seconds.clear()
        self._steps = 0
        return result


class PhaseClock:
    """Seconds between successive laps, by name (a phase never reached is absent)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now
