"""`hpcllm bench checkpoint`: what a checkpoint costs the training, written synchronously or in the
background (`train.async_checkpoint`), in step time and in memory.

Each variant is one `hpcllm train` process on one rank, a model whose checkpoint takes over a
second to write here (12 x 512: 40 M parameters, 0.5 GB of weights and Adam state), a checkpoint
every `every` steps. Every step is logged, so metrics.jsonl holds each step's duration; a
checkpoint's cost is the time the steps after it took beyond the median step of the run (the
save of step k lands in step k+1's interval, and a background write slows the steps it overlaps
on a CPU node). Peak memory is the process's own peak RSS, read by a parent that waits for it
(getrusage of its children). Variants are interleaved, `repeat` times.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from hpcllm.cluster.launcher import run_launched

MODEL = ["model.n_layer=12", "model.n_head=8", "model.n_embd=512", "model.block_size=64"]
VARIANTS = {"sync": "train.async_checkpoint=false", "async": "train.async_checkpoint=true"}
# The parent that runs a command and prints its peak RSS (KiB on Linux) when it has exited.
PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def _train(data: Path, out: Path, steps: int, every: int, variant: str) -> list[str]:
    sets = [*MODEL, "train.global_batch=8", "train.micro_batch=8", "train.log_every=1", "train.eval_every=0"]
    sets += [f"train.ckpt_every={every}", "train.keep=1", "train.check_replicas_every=0", VARIANTS[variant]]
    flags = [item for s in sets for item in ("--set", s)]
    train = [sys.executable, "-m", "hpcllm.cli", "train", "--data", str(data), "--out", str(out)]
    return [*train, "--steps", str(steps), "--quiet", *flags]


def measure(data: Path, workdir: Path, steps: int, every: int, variant: str) -> dict[str, Any]:
    """One run of a variant: median step, extra seconds per checkpoint, peak RSS."""
    out = workdir / f"{variant}-{len(list(workdir.iterdir()))}"
    command = [sys.executable, "-c", PEAK_RSS, *_train(data, out, steps, every, variant)]
    stdout = run_launched(command, f"the {variant} checkpoint run")
    peak_kib = int(stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows}
    durations = {step: elapsed[step] - elapsed[step - 1] for step in elapsed if step - 1 in elapsed}
    # Steps 2..every are the run's own pace (step 1 includes start-up); a checkpoint's cost is what
    # the steps after it (up to the next one) took beyond that pace.
    quiet = [d for step, d in durations.items() if step <= every]
    pace = statistics.median(quiet)
    saves = range(every, steps - every + 1, every)
    costs = [sum(durations[s] - pace for s in range(save + 1, save + every + 1)) for save in saves]
    size = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*.safetensors"))
    return {
        "variant": variant,
        "step_s": pace,
        "checkpoint_cost_s": statistics.median(costs),
        "peak_rss_mib": peak_kib / 1024,
        "checkpoint_mb": size / 1e6,
    }


def run(data: Path, steps: int, every: int, repeat: int) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="hpcllm-bench-ckpt-") as tmp:
        for _ in range(repeat):
            for variant in VARIANTS:
                rows[variant].append(measure(data, Path(tmp), steps, every, variant))
    summary = []
    for variant, runs in rows.items():
        merged = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "variant"}
        summary.append({"variant": variant, **merged})
    sync, background = summary
    return {
        "rows": summary,
        "steps": steps,
        "every": every,
        "repeat": repeat,
        "cost_ratio": background["checkpoint_cost_s"] / sync["checkpoint_cost_s"],
        "extra_memory_mib": background["peak_rss_mib"] - sync["peak_rss_mib"],
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{'checkpoint':<10} {'step s':>8} {'cost per checkpoint s':>22} {'peak RSS MiB':>13} {'shard MB':>9}"
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['variant']:<10} {r['step_s']:>8.3f} {r['checkpoint_cost_s']:>22.3f} "
            f"{r['peak_rss_mib']:>13.0f} {r['checkpoint_mb']:>9.0f}"
        )
    lines.append(
        f"background / synchronous cost per checkpoint: {result['cost_ratio']:.2f}; the host copy costs "
        f"{result['extra_memory_mib']:+.0f} MiB of peak RSS ({result['repeat']} interleaved runs of "
        f"{result['steps']} steps, a checkpoint every {result['every']})"
    )
    return "\n".join(lines)
