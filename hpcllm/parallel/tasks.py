"""Task-parallel work over ranks with dynamic load balancing.

Every rank is a worker (rank 0 included, which matters when there are only a few ranks): the next
task index comes from a shared counter in an MPI one-sided window (`MPI_Fetch_and_op`), so a rank
that drew a small task simply draws again. Tasks are handed out in the caller's order; handing out
the largest first (see `largest_first`) keeps the tail short when task sizes differ greatly.

Each rank gets back only the results of the tasks it ran; where results must be combined in a
fixed order (so the output does not depend on the rank count), the caller writes them by task
index — see data/prepare.py. Items of equal cost need no queue: `round_robin_map` deals them out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def largest_first(sizes: Sequence[int]) -> list[int]:
    """Task indices by decreasing size (ties by index): the classic LPT order for a work queue."""
    return sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))


class SharedCounters:
    """Job-wide counters on rank 0 that any rank can fetch-and-add without rank 0's help."""

    def __init__(self, comm: Any, slots: int = 1):
        from mpi4py import MPI

        self._MPI = MPI
        itemsize = np.dtype(np.int64).itemsize
        size = itemsize * slots if comm.Get_rank() == 0 else 0
        self.window = MPI.Win.Allocate(size, itemsize, comm=comm)
        if comm.Get_rank() == 0:
            np.frombuffer(self.window.tomemory(), dtype=np.int64)[:] = 0
        comm.Barrier()  # nobody fetches before rank 0 zeroed them

    def fetch_add(self, slot: int = 0, amount: int = 1) -> int:
        """Add `amount` to counter `slot`; return its value before the addition (atomic)."""
        MPI = self._MPI
        increment = np.array([amount], dtype=np.int64)
        previous = np.zeros(1, dtype=np.int64)
        self.window.Lock(0, MPI.LOCK_SHARED)
        self.window.Fetch_and_op(increment, previous, 0, slot, MPI.SUM)
        self.window.Unlock(0)
        return int(previous[0])

    def free(self) -> None:
        """Collective."""
        self.window.Free()


def dynamic_map(
    comm: Any,
    order: Sequence[int],
    work: Callable[[int], T],
    on_done: Callable[[int, T], None] | None = None,
    team: Any = None,
) -> Iterator[tuple[int, T]]:
    """Run `work(task)` for the tasks of `order`, each exactly once somewhere in the job.

    Collective: every rank of `comm` must iterate it to the end. Yields (task, result) for the
    tasks this rank ran; `on_done` sees them too (progress bars). With `team` (a communicator
    splitting `comm` into teams, e.g. a tensor-parallel group), a team takes each task together:
    its rank 0 fetches the next one and hands it to the others.
    """
    counter = SharedCounters(comm)
    try:
        while True:
            fetches = team is None or team.Get_rank() == 0
            position = counter.fetch_add() if fetches else None
            if team is not None:
                position = team.bcast(position, root=0)
            if position >= len(order):
                break
            task = order[position]
            result = work(task)
            if on_done is not None:
                on_done(task, result)
            yield task, result
    finally:
        counter.free()


def round_robin_map(comm: Any, count: int, work: Callable[[range], list[T]]) -> list[T]:
    """Collective: the results of items 0..count-1, in order, on every rank; rank r computes items
    r, r + size, ... (`work` gets that range and returns one result per item)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    everyone = comm.allgather(work(range(rank, count, size)))
    return [everyone[i % size][i // size] for i in range(count)]
