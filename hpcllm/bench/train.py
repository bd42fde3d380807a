"""`hpcllm bench train`: hpcllm against what users would run instead, side by side in one invocation.

Same model, data, global batch and micro-batching for every variant:

    a   hpcllm, world size 1                  (all cores to one process)
    a1  hpcllm, world size 1, one thread      (the per-rank baseline of the scaling efficiency)
    b   a plain single-process PyTorch loop
    c   hpcllm, dp = 2 under mpirun           (Horovod allreduce)
    d   torch DistributedDataParallel (gloo), 2 ranks under mpirun
    L   hpcllm in a given layout (--layout tp=..,pp=..,dp=..,...), tp * pp * dp ranks under mpirun
        (what `hpcllm plan validate` measures)

Throughput is taken per logging interval (10 steps) after the first, reported as median and
min–max; MFU is against the machine's measured fp32 matmul peak (all cores). Each variant also
reports where a step's time goes (data, forward, backward, allreduce wait, optimizer: ms per step
on rank 0), from the same per-step timer `hpcllm train` writes to metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpcllm.cluster.launcher import launch_command, launch_env, run_launched
from hpcllm.data.tokens import open_prepared
from hpcllm.model.registry import family_of
from hpcllm.observe.metrics import measure_matmul_peak
from hpcllm.training import config as config_mod

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
VARIANTS = ("a", "a1", "b", "c", "d")
RATIOS = [  # (numerator, denominator, its multiplier, label)
    ("a", "b", 1, "a/b (hpcllm ws1 vs plain loop, target >= 0.97)"),
    ("c", "d", 1, "c/d (hpcllm dp=2 vs DDP gloo, target >= 1.0)"),
    ("c", "a1", 2, "c/(2*a1) (dp=2 scaling efficiency per core)"),
    ("c", "a", 1, "c/a (dp=2 vs ws1 on the same cores)"),
]


@dataclass
class Variant:
    key: str
    name: str
    ranks: int
    sets: list[str] = field(default_factory=list)  # extra --set pairs of a sweep
    rates: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def phase_medians(self) -> dict[str, float]:
        names = dict.fromkeys(name for interval in self.phases for name in interval)
        return {name: statistics.median(p.get(name, 0.0) for p in self.phases) for name in names}


Measured = tuple[list[float], list[dict[str, float]]]  # tokens/s and ms per phase, per interval


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hpcllm(data: Path, steps: int, sets: list[str], ranks: int, env: dict[str, str], work: Path) -> Measured:
    out = work / f"hpcllm-{ranks}-{len(list(work.iterdir()))}"
    prefix = launch_command(ranks, "mpirun") if ranks > 1 else []
    run_launched(
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
        f"hpcllm train ({ranks} ranks)",
        env,
        run_dir=out,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Rows at steps 1, 10, 20, ...: the first two intervals hold start-up and warm-up.
    kept = [r for r in rows if r["step"] > 10]
    return [r["tokens_per_s"] for r in kept], [r["phase_ms"] for r in kept]


def _baseline(
    kind: str, data: Path, steps: int, sets: list[str], ranks: int, env: dict[str, str]
) -> Measured:
    prefix = launch_command(ranks, "mpirun") if ranks > 1 else []
    env = env | {"HPCLLM_BENCH_INIT": f"tcp://127.0.0.1:{_free_port()}"}
    out = run_launched(
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
            *sets,
        ],
        f"the {kind} baseline ({ranks} ranks)",
        env,
    )
    result = json.loads(out.strip().splitlines()[-1])
    return result["tokens_per_s"][1:], result["phase_ms"][1:]


def _variants(
    keys: list[str], sweeps: list[tuple[str, list[str]]], layouts: list[tuple[str, int, list[str]]]
) -> list[Variant]:
    known = {
        "a": Variant("a", "hpcllm, world size 1", 1),
        "a1": Variant("a1", "hpcllm, world size 1, 1 thread", 1),
        "b": Variant("b", "plain PyTorch loop", 1),
        "c": Variant("c", "hpcllm, dp=2 (Horovod)", 2),
        "d": Variant("d", "torch DDP (gloo), 2 ranks", 2),
    }
    variants = [known[key] for key in keys]
    for key, values in sweeps:
        for value in values:
            variants.append(Variant("c", f"hpcllm, dp=2, {key}={value}", 2, ["--set", f"{key}={value}"]))
    variants += [Variant("L", name, ranks, flags) for name, ranks, flags in layouts]
    return variants


def run(
    data: Path,
    steps: int,
    sets: list[str],
    repeat: int = 1,
    keys: tuple[str, ...] = VARIANTS,
    sweeps: list[tuple[str, list[str]]] | None = None,
    timeline: Path | None = None,
    layouts: list[tuple[str, int, list[str]]] | None = None,
) -> dict[str, Any]:
    """Run every variant `repeat` times, interleaved (a, a1, b, c, d, a, ...), so slow drifts of a
    shared machine fall on all variants alike; intervals of all repeats are pooled. A sweep adds
    variants of c, one per value of a config key. With `timeline`, one more run of c records
    Horovod's timeline (apart, so that tracing does not slow the measured runs)."""
    env = launch_env()
    one_thread = env | {"OMP_NUM_THREADS": "1"}
    variants = _variants(list(keys), sweeps or [], layouts or [])
    with tempfile.TemporaryDirectory(prefix="hpcllm-bench-") as tmp:
        work = Path(tmp)

        def measure(variant: Variant) -> Measured:
            extra = sets + variant.sets
            if variant.key == "a":
                return _hpcllm(data, steps, extra, 1, env, work)
            if variant.key == "a1":
                return _hpcllm(data, steps, extra, 1, one_thread, work)
            if variant.key == "b":
                return _baseline("plain", data, steps, extra, 1, env)
            if variant.key in ("c", "L"):
                return _hpcllm(data, steps, extra, variant.ranks, env, work)
            return _baseline("ddp", data, steps, extra, 2, env)

        for _ in range(repeat):
            for variant in variants:
                rates, phases = measure(variant)
                variant.rates += rates
                variant.phases += phases
        if timeline is not None:
            _hpcllm(data, steps, sets + ["--set", f"horovod.timeline={timeline.resolve()}"], 2, env, work)
    return _report(variants, data, sets, steps, repeat, timeline)


def _report(
    variants: list[Variant], data: Path, sets: list[str], steps: int, repeat: int, timeline: Path | None
) -> dict[str, Any]:
    """Rows per variant (median tokens/s, MFU against a measured peak, scaling) and the ratios."""
    config = config_mod.load(assignments=sets[1::2])
    vocab = open_prepared(data, verify=False).vocab_size

    def flops_per_token(extra: list[str]) -> float:
        """Of the model a variant trains: the common settings and its own (a sweep of presets)."""
        own = [value for flag, value in zip(extra, extra[1:], strict=False) if flag == "--set"]
        model = config_mod.load(assignments=[*sets[1::2], *own]).model
        family = family_of(model)
        return family.flops_per_token(family.shape(model, vocab))

    per_token = flops_per_token([])
    # hpcllm's variants run on the GPU when there is one; MFU is then against its matmul peak in
    # the training dtype (bf16 tensor cores), as nanoGPT-class trainers report it.
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if config.train.dtype == "bfloat16" else torch.float32
    peak = measure_matmul_peak(device, seconds=1.0, dtype=dtype)
    by_key = {v.key: v for v in variants if not v.sets}
    one_thread = by_key.get("a1")

    def scaling(v: Variant) -> float | None:
        """Throughput over (ranks x one single-threaded rank): 1.0 is perfect scaling."""
        return v.median / (v.ranks * one_thread.median) if one_thread and v.ranks > 1 else None

    rows = [
        {
            "name": v.name,
            "key": v.key,
            "ranks": v.ranks,
            "tokens_per_s": v.median,
            "min": min(v.rates),
            "max": max(v.rates),
            "mfu": v.median * flops_per_token(v.sets) / peak,
            "scaling_efficiency": scaling(v),
            "phase_ms": v.phase_medians(),
            "intervals": len(v.rates),
        }
        for v in variants
    ]
    ratios = {}
    for top, bottom, times, label in RATIOS:
        if top in by_key and bottom in by_key:
            ratios[label] = by_key[top].median / (times * by_key[bottom].median)
    return {
        "rows": rows,
        "ratios": ratios,
        "peak_flops": peak,
        "flops_per_token": per_token,
        "model": config.model.preset,
        "steps": steps,
        "repeat": repeat,
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": config.train.dtype,
        "torch": torch.__version__,
        "timeline": str(timeline) if timeline else None,
    }


def render(result: dict[str, Any]) -> str:
    width = max(len(r["key"] + r["name"]) + 1 for r in result["rows"])
    lines = [
        f"model {result['model']}, {result['steps']} steps per variant x {result['repeat']} (interleaved), "
        f"{result['cpus']} CPUs, device {result.get('device', 'cpu')}, "
        f"measured {result.get('dtype', 'float32')} matmul peak {result['peak_flops'] / 1e9:,.0f} GFLOP/s",
        f"{'variant':<{width}} {'ranks':>5} {'tokens/s (median)':>18} {'min-max':>17} {'MFU':>6} "
        f"{'scaling':>8}",
    ]
    for r in result["rows"]:
        scaling = f"{r['scaling_efficiency']:.2f}" if r["scaling_efficiency"] is not None else "-"
        lines.append(
            f"{r['key'] + ' ' + r['name']:<{width}} {r['ranks']:>5} {r['tokens_per_s']:>18,.0f} "
            f"{r['min']:>8,.0f}-{r['max']:<8,.0f} {r['mfu']:>6.1%} {scaling:>8}"
        )
    lines.append("where a step's time goes (ms per step on rank 0, median over intervals):")
    phases = list(dict.fromkeys(name for r in result["rows"] for name in r["phase_ms"]))
    lines.append(f"{'variant':<{width}} " + " ".join(f"{name:>10}" for name in phases) + f" {'total':>10}")
    for r in result["rows"]:
        cells = [f"{r['phase_ms'][n]:>10.1f}" if n in r["phase_ms"] else f"{'-':>10}" for n in phases]
        total = sum(r["phase_ms"].values())
        lines.append(f"{r['key'] + ' ' + r['name']:<{width}} " + " ".join(cells) + f" {total:>10.1f}")
    lines += [f"{name}: {value:.3f}" for name, value in result["ratios"].items()]
    if result.get("timeline"):
        lines.append(
            f"Horovod timeline of a separate dp=2 run: {result['timeline']} (open in chrome://tracing)"
        )
    return "\n".join(lines)
