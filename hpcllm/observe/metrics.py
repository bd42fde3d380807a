"""What a person reads about a run: metrics.jsonl, loss.png, throughput and MFU, the baseline.

Only rank 0 writes here; every number it writes has already been reduced over the ranks.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpcllm.observe import plots


def measure_matmul_peak(
    device: torch.device, seconds: float = 0.5, n: int | None = None, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of a large matmul in `dtype` on this rank's threads (CPU) or device: the MFU
    denominator. On a GPU the matrix is 8192² so that the tensor cores are saturated."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * runs / (time.perf_counter() - start)


class MetricsLog:
    """Appends one JSON object per logged step and keeps loss.png up to date."""

    def __init__(self, run_dir: Path, resume: bool):
        self.path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "loss.png"
        self.rows: list[dict[str, Any]] = []
        if resume and self.path.exists():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows past the checkpoint: those steps are about to be run again."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(clean)
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")

    def plot(self, baseline: float | None = None) -> None:
        fig, ax = plots.figure()
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="val loss")
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle="--", label=f"unigram baseline {baseline:.2f}")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        plots.save(fig, self.plot_path)


@dataclass
class Throughput:
    """Tokens per second and MFU over the interval since the last logged step."""

    tokens_per_step: int
    flops_per_token: float
    peak_total: float  # FLOP/s of all ranks together
    last_step: int
    started: float = field(default_factory=time.perf_counter)
    last_time: float = field(init=False)
    trained: int | None = None  # targets the loss counted since the last interval, when some are masked

    def __post_init__(self) -> None:
        self.last_time = self.started

    def interval(self, done: int) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self.last_time, 1e-9)
        tokens_per_s = (done - self.last_step) * self.tokens_per_step / seconds
        self.last_time, self.last_step = now, done
        mfu = tokens_per_s * self.flops_per_token / self.peak_total
        row = {"tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed_s": now - self.started}
        if self.trained is not None:  # fine-tuning: the tokens that teach, padding and prompts aside
            row["trained_tokens_per_s"] = self.trained / seconds
            self.trained = 0
        return row
