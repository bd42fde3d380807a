"""Checkpoints that do not stop training (`train.async_checkpoint`): the step's state is copied to
host memory at the step boundary, a background thread writes and fsyncs the shard while training
goes on, and the manifest and `latest` follow once every rank's write is done.

The thread only writes files. Every collective (the staging directory, a sharded optimizer's
gather, agreeing that all writes are done, the manifest) stays on the main thread between steps,
so MPI never sees a second thread of ours. Crash safety is the synchronous path's: the files go
to the hidden staging directory, and `latest` moves only after the manifest, so a crash during a
background write leaves `latest` on the previous complete checkpoint. A second save waits for
the first; a preempted or finished run waits for the last.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mpi4py import MPI

from hpcllm.cluster import watchdog
from hpcllm.errors import TrainingFailure
from hpcllm.parallel.grid import Grid
from hpcllm.training import checkpoint
from hpcllm.training.snapshot import ShardSnapshot, take_snapshot

log = logging.getLogger("hpcllm.training")


@dataclass
class _Write:
    step: int
    staging: Path
    extra: dict[str, Any]
    host_bytes: int  # the snapshot's size: what this rank holds in host memory until it is written
    started: float = field(default_factory=time.perf_counter)
    written: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    thread: threading.Thread | None = None

    @property
    def finished(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


class BackgroundSaver:
    """Collective methods: every rank calls them at the same steps."""

    def __init__(self, run_dir: Path, grid: Grid, keep: int):
        self.run_dir, self.grid, self.keep = run_dir, grid, keep
        self.pending: _Write | None = None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
        after_shard: Callable[[], None] | None = None,
    ) -> None:
        """Snapshot now, write in the background (after the previous write is complete)."""
        self.wait()
        staging = checkpoint.begin(self.run_dir, step, self.grid)
        snapshots = take_snapshot(model, optimizer, self.grid)
        write = _Write(step, staging, extra, sum(s.nbytes for s in snapshots))
        write.thread = threading.Thread(
            target=_write_files, args=(write, snapshots, after_shard), name=f"checkpoint-{step}", daemon=True
        )
        write.thread.start()
        self.pending = write

    def poll(self) -> Path | None:
        """At a step's end: complete the pending checkpoint if every rank's write is done (one
        one-integer allreduce while a write is pending, nothing otherwise)."""
        if self.pending is None:
            return None
        with watchdog.waiting("checkpoint write agreement"):
            done = self.grid.world.allreduce(int(self.pending.finished), op=MPI.MIN)
        return self._complete() if done else None

    def wait(self) -> Path | None:
        """Wait for the pending write, then complete it (before a second save, and before the run
        exits: finished or preempted)."""
        if self.pending is None:
            return None
        if self.pending.thread is not None:
            self.pending.thread.join()
        return self._complete()

    def _complete(self) -> Path:
        write, self.pending = self.pending, None
        assert write is not None
        with watchdog.waiting("checkpoint write agreement"):
            errors = self.grid.world.allgather(write.error)
        failed = next(((rank, e) for rank, e in enumerate(errors) if e is not None), None)
        if failed is not None:
            raise TrainingFailure(
                f"the checkpoint of step {write.step} could not be written on rank {failed[0]}: {failed[1]}"
            )
        path = checkpoint.publish(write.staging, write.step, self.grid, write.written, write.extra, self.keep)
        log.info(
            "checkpoint of step %d complete, written in the background in %.2f s (%.1f MB held on the host)",
            write.step,
            time.perf_counter() - write.started,
            write.host_bytes / 1e6,
        )
        return path


def _write_files(write: _Write, snapshots: list[ShardSnapshot], after_shard: Any) -> None:
    """The background thread: this rank's files, or the reason they could not be written."""
    try:
        # Below the training threads: on a busy CPU node the write takes longer, not the steps.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux
        pass
    try:
        write.written = checkpoint.write_snapshot(write.staging, snapshots)
        if after_shard is not None:
            after_shard()
    except Exception as exc:  # reported on the main thread, by every rank alike
        write.error = f"{type(exc).__name__}: {exc}"
