"""Stall watchdog: a rank that waits in a collective longer than `timeout_s` ends the job, with
every rank's Python stack in its log and a message naming the ranks that did not arrive.

Modelled on Horovod's stall check. The training loop marks each wait (`with watchdog.waiting(
"gradient allreduce"):`, a no-op while no watchdog runs); a thread per rank reports its rank's
state to rank 0 every few seconds over a communicator of its own (MPI_THREAD_MULTIPLE), so the
reports flow while the main thread is blocked. Rank 0's thread judges: once some rank has waited
past the timeout, it asks every rank to dump its stacks (faulthandler, into logs/rank-N.log),
names the ranks that are not waiting (or stopped reporting: dead, or stuck holding the GIL), and
calls MPI_Abort. If rank 0 itself cannot judge, a rank that has waited twice the timeout aborts
on its own.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import IO, Any

log = logging.getLogger("hpcllm.watchdog")

EXIT_STALLED = 70  # EX_SOFTWARE
STATE, DUMP, DUMPED = 11, 12, 13  # message tags on the watchdog's communicator


@dataclass
class RankState:
    label: str | None  # the collective this rank waits in, or None
    waited_s: float  # how long it has waited there
    count: int  # collectives entered so far
    step: int


def _describe(rank: int, state: RankState | None, silent_s: float | None) -> str:
    if state is None:
        return f"rank {rank} never reported"
    if silent_s is not None:
        return f"rank {rank} stopped reporting {silent_s:.0f} s ago (dead, or stuck holding the GIL)"
    where = f"waiting in {state.label!r} for {state.waited_s:.0f} s" if state.label else "not in a collective"
    return f"rank {rank} at step {state.step}, {where}"


class Watchdog:
    def __init__(self, comm: Any, timeout_s: float, dump_file: IO[str] | None = None):
        self.comm = comm.Dup()  # collective: its traffic never mixes with the training's
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout_s = timeout_s
        self.poll_s = max(0.2, min(5.0, timeout_s / 4))
        self.dump_file = dump_file
        self.step = 0
        self._label: str | None = None
        self._since = 0.0
        self._count = 0
        self._stop = threading.Event()
        self._pending: list[Any] = []
        self._thread = threading.Thread(target=self._run, name="hpcllm-watchdog", daemon=True)

    # ---- the main thread's side: cheap marks around every wait ---------------------------------

    @contextmanager
    def waiting(self, label: str) -> Iterator[None]:
        self._since, self._label = time.monotonic(), label
        self._count += 1
        try:
            yield
        finally:
            self._label = None

    def state(self) -> RankState:
        label = self._label
        waited = time.monotonic() - self._since if label else 0.0
        return RankState(label, waited, self._count, self.step)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for request in self._pending:
            request.Wait()

    # ---- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        reports: dict[int, tuple[RankState, float]] = {}
        while not self._stop.wait(self.poll_s):
            state = self.state()
            if self.comm.iprobe(source=0, tag=DUMP):
                self.comm.recv(source=0, tag=DUMP)
                self._dump_stacks()
                self.comm.send(True, dest=0, tag=DUMPED)
                continue
            if self.rank != 0:
                self._pending = [r for r in self._pending if not r.Test()]
                self._pending.append(self.comm.isend(state, dest=0, tag=STATE))
                if state.label and state.waited_s > 2 * self.timeout_s:
                    self._dump_stacks()
                    self._abort(
                        [
                            f"watchdog: rank {self.rank} waited {state.waited_s:.0f} s in {state.label!r} "
                            "and rank 0's watchdog did not end the job (rank 0 is stuck or gone)"
                        ]
                    )
                continue
            now = time.monotonic()
            reports[0] = (state, now)
            while self.comm.iprobe(tag=STATE):
                status = _status()
                report = self.comm.recv(tag=STATE, status=status)
                reports[status.Get_source()] = (report, now)
            stalled = [r for r, (s, _) in sorted(reports.items()) if s.label and s.waited_s > self.timeout_s]
            if stalled:
                self._judge(stalled, reports, now)

    def _judge(self, stalled: list[int], reports: dict[int, tuple[RankState, float]], now: float) -> None:
        silent_after = 3 * self.poll_s + 1
        first = reports[stalled[0]][0]
        missing = []  # not waiting, waiting elsewhere (collectives called in another order), or silent
        for rank in range(self.size):
            state, seen = reports.get(rank, (None, now))
            silent = now - seen if state is not None and now - seen > silent_after else None
            if state is None or silent is not None or state.label != first.label:
                missing.append(_describe(rank, state, silent))
        stalled = [r for r in stalled if reports[r][0].label == first.label]
        who = f"rank {stalled[0]}" if len(stalled) == 1 else f"ranks {', '.join(map(str, stalled))}"
        lines = [
            f"watchdog: {who} waited more than {self.timeout_s:g} s in {first.label!r} at step {first.step} "
            f"(train.watchdog_s = {self.timeout_s:g}); "
            + ("did not arrive: " + "; ".join(missing) if missing else "every rank is waiting (a deadlock)"),
        ]
        # Ask every rank for its stacks; a rank that cannot answer (dead, GIL held) is not waited for long.
        for rank in range(1, self.size):
            self.comm.isend(True, dest=rank, tag=DUMP)
        self._dump_stacks()
        # gdb takes a second or more per rank (native_stacks); a silent rank is not waited for long.
        deadline = time.monotonic() + min(10.0, 2 * self.poll_s + 2) + (15.0 if shutil.which("gdb") else 0.0)
        answered = 0
        while answered < self.size - 1 and time.monotonic() < deadline:
            if self.comm.iprobe(tag=DUMPED):
                self.comm.recv(tag=DUMPED)
                answered += 1
            else:
                time.sleep(0.05)
        lines.append(f"stacks of {answered + 1} of {self.size} ranks are in logs/rank-N.log (faulthandler)")
        self._abort(lines)

    def _dump_stacks(self) -> None:
        """Into the rank's log file (stderr when there is none): stacks of every rank would bury
        the console. Python's, then the native ones (gdb), which show where a thread waits inside
        MPI or Horovod's background thread, where Python's stop at the call."""
        out = self.dump_file or sys.stderr
        out.write(f"[rank {self.rank}] watchdog: Python stacks of every thread:\n")
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
        out.write(f"[rank {self.rank}] watchdog: native stacks of every thread:\n{native_stacks()}\n")
        out.flush()

    def _abort(self, lines: list[str]) -> None:
        handlers = logging.getLogger("hpcllm").handlers
        for line in lines:
            if handlers:
                log.critical("%s", line)
            else:
                sys.stderr.write(f"[rank {self.rank}] {line}\n")
        for handler in handlers:
            handler.flush()
        sys.stderr.flush()
        self.comm.Abort(EXIT_STALLED)


def native_stacks(timeout_s: float = 30.0) -> str:
    """Every thread's native stack of this process, from gdb attached for a moment (the process
    is paused meanwhile); a line saying why not when gdb is missing or may not attach."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(gdb is not installed: no native stacks)"
    _allow_tracing_by_any_process()
    command = [gdb, "-p", str(os.getpid()), "-batch", "-nx", "-ex", "set print frame-arguments none"]
    command += ["-ex", "thread apply all bt 40"]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(gdb failed: {exc})"
    threads = done.stdout[done.stdout.find("\nThread ") + 1 :] if "\nThread " in done.stdout else ""
    return threads or f"(gdb could not attach: {done.stderr.strip().splitlines()[-1:] or done.returncode})"


def _allow_tracing_by_any_process() -> None:
    """Under Yama's ptrace_scope 1 a process may be traced only by its ancestors unless it says
    otherwise; gdb is this rank's child (prctl PR_SET_PTRACER, PR_SET_PTRACER_ANY; Linux only)."""
    import ctypes

    PR_SET_PTRACER, PR_SET_PTRACER_ANY = 0x59616D61, ctypes.c_ulong(-1)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _status() -> Any:
    from mpi4py import MPI

    return MPI.Status()


class _Idle:
    """Stands in while no watchdog runs: every mark is the same reusable null context."""

    step = 0
    _mark = nullcontext()

    def waiting(self, label: str) -> nullcontext[None]:
        return self._mark

    def stop(self) -> None:
        pass


_active: Watchdog | _Idle = _Idle()


def waiting(label: str) -> Any:
    """Mark a wait in a collective (or for a neighbour) of this rank's main thread."""
    return _active.waiting(label)


def set_step(step: int) -> None:
    _active.step = step


def start(comm: Any, timeout_s: float) -> None:
    """Collective. With timeout_s = 0 or a single rank nothing is started."""
    global _active
    from mpi4py import MPI

    if timeout_s <= 0 or comm.Get_size() == 1:
        return
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        log.warning("MPI does not provide MPI_THREAD_MULTIPLE: no stall watchdog")
        return
    rank_log = next(
        (h.stream for h in logging.getLogger("hpcllm").handlers if isinstance(h, logging.FileHandler)), None
    )
    _active = Watchdog(comm, timeout_s, rank_log).start()


def stop() -> None:
    global _active
    _active.stop()
    _active = _Idle()
