"""Stopping cleanly on a signal: finish the step, checkpoint, exit with code 75 so a batch script
(see slurm/) can requeue the job and the next run resumes from that checkpoint.

SIGUSR2 is the preemption signal the Slurm templates ask for (`--signal=B:USR2@N`; NCCL may claim
USR1); SIGTERM (scancel, mpirun's teardown) and SIGINT (Ctrl-C) are treated alike. The handler only
sets a flag; the ranks agree on stopping through a one-integer allreduce at the end of each step,
so they all stop after the same step even if the signal reached them at different moments.
"""

from __future__ import annotations

import signal
from typing import Any

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised after the checkpoint is written; the command line exits with EXIT_PREEMPTED."""

    exit_code = EXIT_PREEMPTED


class StopFlag:
    def __init__(self) -> None:
        self.signal: int = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def agreed(self, comm: Any) -> int:
        """Collective: the signal any rank received (0 if none)."""
        from mpi4py import MPI

        from hpcllm.cluster import watchdog

        with watchdog.waiting("stop-signal agreement"):
            return int(comm.allreduce(self.signal, op=MPI.MAX))
