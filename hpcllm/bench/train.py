"""`hpcllm bench train`: hpcllm against what users would run instead, side by side in one invocation.

Same model, data, global batch and micro-batching for every variant:

    a   hpcllm, world size 1                  (all cores to one process)
    a1  hpcllm, world size 1, one thread      (the per-rank baseline of the scaling efficiency)
    b   a plain single-process PyTorch loop
    c   hpcllm, dp = 2 under mpirun           (Horovod allreduce)
    d   torch DistributedDataParallel (gloo), 2 ranks under mpirun

Throughput is taken per logging interval (10 steps) after the first, reported as median and
min–max; MFU is against the machine's measured fp32 matmul peak (all cores).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcllm import config as config_mod
from hpcllm.data.tokens import open_prepared
from hpcllm.launcher import launch_command, launch_env
from hpcllm.metrics import measure_matmul_peak
from hpcllm.model.gpt import GPT, GPTShape, flops_per_token

QUIET = [
    "--set",
    "train.eval_every=0",
    "--set",
    "train.ckpt_every=0",
    "--set",
    "train.log_every=10",
    "--set",
    "train.peak_flops=1",
]


@dataclass
class Variant:
    key: str
    name: str
    ranks: int
    rates: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(command: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark step failed: {' '.join(command)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _hpcllm(
    data: Path, steps: int, sets: list[str], ranks: int, env: dict[str, str], work: Path
) -> list[float]:
    out = work / f"hpcllm-{ranks}-{len(list(work.iterdir()))}"
    prefix = launch_command(ranks, "mpirun") if ranks > 1 else []
    _run(
        prefix
        + [
            sys.executable,
            "-m",
            "hpcllm.cli",
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            str(steps),
            *QUIET,
            *sets,
        ],
        env,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Rows at steps 1, 10, 20, ...: the first two intervals hold start-up and warm-up.
    return [r["tokens_per_s"] for r in rows if r["step"] > 10]


def _baseline(
    kind: str, data: Path, steps: int, sets: list[str], ranks: int, env: dict[str, str]
) -> list[float]:
    prefix = launch_command(ranks, "mpirun") if ranks > 1 else []
    env = env | {"HPCLLM_BENCH_INIT": f"tcp://127.0.0.1:{_free_port()}"}
    set_args = [a for pair in zip(["--set"] * (len(sets) // 2), sets[1::2], strict=True) for a in pair]
    out = _run(
        prefix
        + [
            sys.executable,
            "-m",
            "hpcllm.bench.baselines",
            kind,
            "--data",
            str(data),
            "--steps",
            str(steps),
            *set_args,
        ],
        env,
    )
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"][1:]


def run(data: Path, steps: int, sets: list[str], repeat: int = 1) -> dict[str, Any]:
    """Run every variant `repeat` times, interleaved (a, a1, b, c, d, a, ...), so slow drifts of a
    shared machine fall on all variants alike; intervals of all repeats are pooled."""
    env = launch_env()
    one_thread = env | {"OMP_NUM_THREADS": "1"}
    variants = [
        Variant("a", "hpcllm, world size 1", 1, []),
        Variant("a1", "hpcllm, world size 1, 1 thread", 1, []),
        Variant("b", "plain PyTorch loop", 1, []),
        Variant("c", "hpcllm, dp=2 (Horovod)", 2, []),
        Variant("d", "torch DDP (gloo), 2 ranks", 2, []),
    ]
    with tempfile.TemporaryDirectory(prefix="hpcllm-bench-") as tmp:
        work = Path(tmp)
        measure = {
            "a": lambda: _hpcllm(data, steps, sets, 1, env, work),
            "a1": lambda: _hpcllm(data, steps, sets, 1, one_thread, work),
            "b": lambda: _baseline("plain", data, steps, sets, 1, env),
            "c": lambda: _hpcllm(data, steps, sets, 2, env, work),
            "d": lambda: _baseline("ddp", data, steps, sets, 2, env),
        }
        for _ in range(repeat):
            for variant in variants:
                variant.rates += measure[variant.key]()
    config = config_mod.load(assignments=sets[1::2])
    prepared = open_prepared(data, verify=False)
    m = config.model
    model = GPT(GPTShape(prepared.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd))
    per_token = flops_per_token(model.shape, model.num_parameters())
    peak = measure_matmul_peak(torch.device("cpu"), seconds=1.0)
    by_key = {v.key: v for v in variants}
    rows = [
        {
            "name": v.name,
            "key": v.key,
            "ranks": v.ranks,
            "tokens_per_s": v.median,
            "min": min(v.rates),
            "max": max(v.rates),
            "mfu": v.median * per_token / peak,
            "intervals": len(v.rates),
        }
        for v in variants
    ]
    ratios = {
        "a/b (hpcllm ws1 vs plain loop, target >= 0.97)": by_key["a"].median / by_key["b"].median,
        "c/d (hpcllm dp=2 vs DDP gloo, target >= 1.0)": by_key["c"].median / by_key["d"].median,
        "c/(2*a1) (dp=2 scaling efficiency per core)": by_key["c"].median / (2 * by_key["a1"].median),
        "c/a (dp=2 vs ws1 on the same cores)": by_key["c"].median / by_key["a"].median,
    }
    return {
        "rows": rows,
        "ratios": ratios,
        "peak_flops": peak,
        "flops_per_token": per_token,
        "model": config.model.preset,
        "steps": steps,
        "repeat": repeat,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}, {result['steps']} steps per variant x {result['repeat']} (interleaved), "
        f"{result['cpus']} CPUs, "
        f"measured matmul peak {result['peak_flops'] / 1e9:.0f} GFLOP/s",
        f"{'variant':<34} {'ranks':>5} {'tokens/s (median)':>18} {'min-max':>17} {'MFU':>6}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['key'] + ' ' + r['name']:<34} {r['ranks']:>5} {r['tokens_per_s']:>18,.0f} "
            f"{r['min']:>8,.0f}-{r['max']:<8,.0f} {r['mfu']:>6.1%}"
        )
    lines += [f"{name}: {value:.3f}" for name, value in result["ratios"].items()]
    return "\n".join(lines)
