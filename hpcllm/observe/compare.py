"""`hpcllm runs compare`: several runs side by side, from their metrics.jsonl and config.yaml.

One PNG with the train (line) and validation (dots) loss of each run against step, and a table:
layout, steps, last and best losses, median tokens/s and MFU, wall time. Runs whose losses are
identical (a layout against the single process, a resumed run against an uninterrupted one) would
hide each other: the table says so and the plot draws the later ones dashed, with markers.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hpcllm.errors import UsageError
from hpcllm.observe import plots


@dataclass
class RunMetrics:
    name: str
    rows: list[dict[str, Any]]
    config: dict[str, Any]

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), int | float)]

    def summary(self) -> dict[str, Any]:
        train, val = self.series("loss"), self.series("val_loss")
        speed = [v for _, v in self.series("tokens_per_s")]
        mfu = [v for _, v in self.series("mfu")]
        parallel = self.config.get("parallel", {})
        elapsed = [v for _, v in self.series("elapsed_s")]
        dp = [v for _, v in self.series("dp")]
        return {
            "run": self.name,
            "tp": parallel.get("tp", 1),
            "pp": parallel.get("pp", 1),
            "dp": dp[-1] if dp else None,  # not logged by runs from before wave 3
            "steps": train[-1][0] if train else 0,
            "last_loss": train[-1][1] if train else None,
            "best_val_loss": min(v for _, v in val) if val else None,
            "tokens_per_s": statistics.median(speed) if speed else None,
            "mfu": statistics.median(mfu) if mfu else None,
            "wall_s": elapsed[-1] if elapsed else None,
        }


def read(run: Path) -> RunMetrics:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"{run} is not a run directory with metrics (metrics.jsonl missing)")
    try:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except ValueError as exc:
        raise UsageError(f"{metrics} is not JSON lines ({exc})") from exc
    config_file = run / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return RunMetrics(run.name or str(run), rows, config or {})


def same_losses(runs: list[RunMetrics]) -> dict[str, str]:
    """For each run whose train and validation losses equal an earlier run's exactly: that run."""
    first: dict[tuple[Any, ...], str] = {}
    same: dict[str, str] = {}
    for run in runs:
        curves = (tuple(run.series("loss")), tuple(run.series("val_loss")))
        if not curves[0]:
            continue
        if curves in first:
            same[run.name] = first[curves]
        else:
            first[curves] = run.name
    return same


def summaries(runs: list[RunMetrics]) -> list[dict[str, Any]]:
    same = same_losses(runs)
    return [r.summary() | {"same_losses_as": same.get(r.name)} for r in runs]


def render(runs: list[RunMetrics]) -> str:
    def number(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = summaries(runs)
    width = max(len("run"), *(len(r["run"]) for r in rows))
    lines = [
        f"{'run':<{width}} {'tp':>3} {'pp':>3} {'dp':>3} {'steps':>6} {'last loss':>9} {'best val':>9} "
        f"{'tokens/s':>10} {'MFU':>6} {'wall s':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r['run']:<{width}} {r['tp']:>3} {r['pp']:>3} {number(r['dp'], '>3')} {r['steps']:>6} "
            f"{number(r['last_loss'], '9.4f')} {number(r['best_val_loss'], '9.4f')} "
            f"{number(r['tokens_per_s'], '10,.0f')} {number(r['mfu'], '6.1%')} {number(r['wall_s'], '7.0f')}"
        )
    for r in rows:
        if r["same_losses_as"]:
            lines.append(f"{r['run']}: losses identical to {r['same_losses_as']}'s (dashed in the plot)")
    return "\n".join(lines)


def plot(runs: list[RunMetrics], path: Path) -> None:
    fig, ax = plots.figure(width=8, height=4.5)
    same = same_losses(runs)
    for run in runs:
        train = run.series("loss")
        if not train:
            continue
        copy = run.name in same
        style = {"linestyle": "--", "marker": "x", "markevery": max(1, len(train) // 12)} if copy else {}
        suffix = f" (= {same[run.name]})" if copy else ""
        (line,) = ax.plot(*zip(*train, strict=True), label=f"{run.name} train{suffix}", **style)
        val = run.series("val_loss")
        if val:
            ax.plot(
                *zip(*val, strict=True),
                "s:" if copy else "o--",
                color=line.get_color(),
                label=f"{run.name} val",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss by run")
    plots.save(fig, path, legend_size=8)
