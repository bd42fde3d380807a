"""`hpcllm bench checkpoint`: what a checkpoint costs the training, written synchronously or in the
background (`train.async_checkpoint`), in time and in memory.

Each variant is one `hpcllm train` process on one rank, a model whose checkpoint takes over a
second to write here (12 x 512: 40 M parameters, 0.5 GB of weights and Adam state). The run
without checkpoints is the reference: a variant's cost per checkpoint is how much longer its
steps took in all (from the end of step 1 to the end of the last step, so start-up is left out)
divided by the checkpoints written meanwhile. Peak memory is the process's own peak RSS, read by
a parent that waits for it (getrusage of its children). Variants are interleaved, `repeat` times,
and the medians kept: this is wall time on a shared machine.
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
VARIANTS = {
    "none": "train.ckpt_every=0",
    "sync": "train.async_checkpoint=false",
    "async": "train.async_checkpoint=true",
}
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
    """One run of a variant: seconds from the end of step 1 to the end of the last, peak RSS."""
    out = workdir / f"{variant}-{len(list(workdir.iterdir()))}"
    command = [sys.executable, "-c", PEAK_RSS, *_train(data, out, steps, every, variant)]
    stdout = run_launched(command, f"the {variant} checkpoint run", run_dir=out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows}
    size = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*.safetensors"))
    return {
        "train_s": elapsed[steps] - elapsed[1],
        "peak_rss_mib": int(stdout.strip().splitlines()[-1]) / 1024,
        "checkpoint_mb": size / 1e6,
    }


def run(data: Path, steps: int, every: int, repeat: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="hpcllm-bench-ckpt-") as tmp:
        for _ in range(repeat):
            for variant in VARIANTS:
                runs[variant].append(measure(data, Path(tmp), steps, every, variant))
    rows = [
        {"variant": variant, **{key: statistics.median(r[key] for r in rs) for key in rs[0]}}
        for variant, rs in runs.items()
    ]
    reference = rows[0]
    saves = (steps - 1) // every  # the checkpoints written before the last step's end
    for row in rows:
        row["cost_per_checkpoint_s"] = (row["train_s"] - reference["train_s"]) / saves
        row["extra_rss_mib"] = row["peak_rss_mib"] - reference["peak_rss_mib"]
    _, sync, background = rows
    ratio = background["cost_per_checkpoint_s"] / sync["cost_per_checkpoint_s"]
    return {"rows": rows, "steps": steps, "every": every, "repeat": repeat, "cost_ratio": ratio}


def render(result: dict[str, Any]) -> str:
    lines = [f"{'variant':<8} {'train s':>8} {'s per checkpoint':>17} {'peak RSS MiB':>13} {'shard MB':>9}"]
    for r in result["rows"]:
        lines.append(
            f"{r['variant']:<8} {r['train_s']:>8.2f} {r['cost_per_checkpoint_s']:>17.3f} "
            f"{r['peak_rss_mib']:>13.0f} {r['checkpoint_mb']:>9.0f}"
        )
    background = result["rows"][2]
    lines.append(
        f"background / synchronous cost per checkpoint: {result['cost_ratio']:.2f}; the host copy costs "
        f"{background['extra_rss_mib']:+.0f} MiB of peak RSS over no checkpoint (medians of "
        f"{result['repeat']} interleaved runs of {result['steps']} steps, one checkpoint every "
        f"{result['every']})"
    )
    return "\n".join(lines)
