"""What rank 0 shows while a run trains: a progress bar on an interactive terminal, and otherwise
(a Slurm .out file, a pipe) one plain line on standard error every `train.log_every` steps: step
of total, loss, learning rate, tokens/s, MFU, elapsed and time left; the validation loss when it is
measured. `quiet` shows nothing but the start-up lines and the summary."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("hpcllm.training")


def clock(seconds: float) -> str:
    """H:MM:SS."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, initial: int, shown: bool, quiet: bool = False):
        self.total, self.initial = total, initial
        self.started = time.perf_counter()
        interactive = shown and not quiet and sys.stderr.isatty()
        self.lines = shown and not quiet and not interactive  # plain lines, as under sbatch
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", desc="train", disable=not interactive)

    def logged(self, row: dict[str, Any]) -> None:
        """A metrics row of a logged step (before the step's `advance`)."""
        summary = f"loss {row['loss']:.3f} | {row['tokens_per_s']:,.0f} tok/s | MFU {row['mfu']:.1%}"
        self.bar.set_postfix_str(summary, refresh=False)
        if not self.lines:
            return
        done = row["step"]
        elapsed = time.perf_counter() - self.started
        left = elapsed / max(done - self.initial, 1) * (self.total - done)
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | %s tok/s | MFU %.1f%% | elapsed %s | left %s",
            done,
            self.total,
            row["loss"],
            row["lr"],
            f"{row['tokens_per_s']:,.0f}",
            100 * row["mfu"],
            clock(elapsed),
            clock(left),
        )

    def validated(self, done: int, val_loss: float) -> None:
        if self.lines:
            log.info("step %d/%d | val loss %.4f", done, self.total, val_loss)

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
