"""One shared file written and hashed by all ranks at once, through MPI-IO.

A task-parallel job ends with every rank holding some runs of the output (byte ranges of its own
spool files) and knowing, from a prefix sum of everyone's sizes, where each run goes. `write_runs`
copies the runs into the shared file in collective rounds (`MPI_File_write_at_all`: the MPI library
can aggregate the ranks' requests into large contiguous writes on a parallel file system), a
bounded chunk at a time, so memory does not grow with the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHUNK_BYTES = 16 << 20  # copied per collective round by each rank


@dataclass(frozen=True)
class Run:
    """`length` bytes of `source` from `start` go to `offset` of the shared file."""

    source: Path
    start: int
    length: int
    offset: int


def prefix_offsets(sizes: Sequence[int]) -> list[int]:
    """Where each of the runs, in order, starts when they are laid end to end."""
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]]).tolist() if sizes else []


def _chunks(runs: Sequence[Run], chunk: int) -> list[tuple[Path, int, int, int]]:
    """(source, position in source, length, offset in the shared file) of every chunk to copy."""
    out = []
    for run in runs:
        out += [
            (run.source, run.start + a, min(chunk, run.length - a), run.offset + a)
            for a in range(0, run.length, chunk)
        ]
    return out


def write_runs(comm: Any, path: Path, size: int, runs: Sequence[Run], chunk: int = CHUNK_BYTES) -> None:
    """Collective: write this rank's runs into `path` (created, `size` bytes in the end)."""
    from mpi4py import MPI

    mine = _chunks(runs, chunk)
    rounds = comm.allreduce(len(mine), op=MPI.MAX)
    handle = MPI.File.Open(comm, str(path), MPI.MODE_WRONLY | MPI.MODE_CREATE)
    try:
        handle.Set_size(size)
        empty = np.empty(0, dtype=np.uint8)
        for index in range(rounds):  # every rank joins every round, with nothing left to write if need be
            if index < len(mine):
                source, start, length, offset = mine[index]
                with open(source, "rb") as f:
                    f.seek(start)
                    data = np.frombuffer(f.read(length), dtype=np.uint8)
                handle.Write_at_all(offset, data)
            else:
                handle.Write_at_all(0, empty)
    finally:
        handle.Close()
