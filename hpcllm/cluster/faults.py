"""Fault injection, to check that failures end a job cleanly (tests/test_reliability.py, and users
who want to see what their cluster's launcher does when a rank dies).

    HPCLLM_FAULT=KIND:rank=R:step=S     e.g. HPCLLM_FAULT=kill:rank=1:step=3
    HPCLLM_FAULT=KIND:node=N:step=S     every rank on node N (a node that dies: kill:node=1:step=5)

KIND is one of
    raise       raise an exception on rank R before training step S
    kill        SIGKILL rank R before step S (what the OOM killer or a dead node looks like)
    hang        rank R stops before step S without entering the next collective (a stall)
    checkpoint  SIGKILL rank R in the middle of writing the checkpoint of step S, after its
                shard's tensors are on disk and before the checkpoint is complete
    nan         rank R's loss of step S is multiplied by NaN: its gradients, and after the
                reduction everyone's, are not finite (what an overflow looks like); without a
                pipeline only (pp = 1)
    corrupt     rank R flips one bit of its first parameter before step S (failing memory, a
                non-deterministic kernel): its replica silently drifts from the others

Unset (the normal case) every hook is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from hpcllm.errors import UsageError

ENV = "HPCLLM_FAULT"
KINDS = ("raise", "kill", "hang", "checkpoint", "nan", "corrupt")


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int | None  # this rank, or
    step: int
    node: int | None = None  # every rank on this node

    def hits(self, rank: int, node: int, step: int) -> bool:
        where = self.rank == rank if self.node is None else self.node == node
        return where and self.step == step


def parse(text: str) -> Fault:
    kind, *fields = text.split(":")
    try:
        values = dict(field.split("=", 1) for field in fields)
        step = int(values.pop("step"))
        if ("rank" in values) == ("node" in values):
            raise KeyError("rank or node")
        rank, node = (int(values.pop(k)) if k in values else None for k in ("rank", "node"))
    except (ValueError, KeyError) as exc:
        raise UsageError(
            f"{ENV}={text!r}: expected KIND:rank=R:step=S or KIND:node=N:step=S, e.g. kill:rank=1:step=3"
        ) from exc
    if kind not in KINDS or values:
        raise UsageError(
            f"{ENV}={text!r}: KIND is one of {', '.join(KINDS)}, with only rank= or node=, and step="
        )
    return Fault(kind, rank, step, node)


def configured() -> Fault | None:
    text = os.environ.get(ENV)
    return parse(text) if text else None


def _fire(fault: Fault, rank: int) -> None:
    sys.stderr.write(
        f"[rank {rank}] {ENV}: injecting '{fault.kind}' at step {fault.step} (t={time.time():.3f})\n"
    )
    sys.stderr.flush()
    if fault.kind == "raise":
        raise InjectedFault(f"fault injected by {ENV} on rank {rank} before step {fault.step}")
    if fault.kind in ("kill", "checkpoint"):
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # hang: alive, holding no lock, never arriving at the next collective
        time.sleep(3600)


def before_step(fault: Fault | None, rank: int, node: int, step: int) -> None:
    """Hook at the start of training step `step` (1-based, as logged)."""
    if fault is not None and fault.kind in ("raise", "kill", "hang") and fault.hits(rank, node, step):
        _fire(fault, rank)


def poisons_loss(fault: Fault | None, rank: int, node: int, step: int) -> bool:
    """Whether this rank's loss of training step `step` is to be made NaN."""
    if fault is not None and fault.kind == "nan" and fault.hits(rank, node, step):
        sys.stderr.write(f"[rank {rank}] {ENV}: a NaN loss at step {step}\n")
        return True
    return False


def during_checkpoint(fault: Fault | None, rank: int, node: int, step: int) -> None:
    """Hook inside a checkpoint write, between this rank's shard and the checkpoint's completion."""
    if fault is not None and fault.kind == "checkpoint" and fault.hits(rank, node, step):
        _fire(fault, rank)


def corrupts(fault: Fault | None, rank: int, node: int, step: int) -> bool:
    """Whether this rank is to flip a bit of its parameters before training step `step`."""
    if fault is not None and fault.kind == "corrupt" and fault.hits(rank, node, step):
        when = f"(t={time.time():.3f})"
        sys.stderr.write(f"[rank {rank}] {ENV}: flipping a bit of a parameter before step {step} {when}\n")
        return True
    return False
