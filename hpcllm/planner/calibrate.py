"""`hpcllm plan calibrate`: measure this machine and write its `local` cluster profile.

Four kinds of measurement, each fitted to the step model's terms:
    model       forward + loss + backward of hpcllm's GPT with 1 and 3 layers, at several hidden sizes
                and tokens per micro-batch, run by one single-threaded rank per core at once (under
                mpirun). The difference of the two is two blocks: per hidden size, time = overhead
                + 3 * forward FLOPs / rate(h) over the token counts gives rate(h) and the fixed cost
                per block, and 1/rate(h) = 1/R + half/(R*h) over the hidden sizes gives the
                sustained rate R and the half-rate hidden size (`gemm_efficiency` = cores * R / peak,
                `gemm_half_size`, `layer_overhead_us`). What the 1-layer model spends outside its
                block (embedding, vocabulary projection, loss) against the projection's FLOPs at
                the large-GEMM rate (it is one GEMM as wide as the vocabulary) gives
                `head_efficiency` and the fixed `micro_batch_overhead_us`. The same 1-layer models
                on one rank with all cores give a first `thread_efficiency`; the peak is a large
                matmul's rate on all cores (the MFU denominator)
    memory      an elementwise add over 64 MB: the bandwidth the optimizer step streams through
    allreduce   `hpcllm bench allreduce` (mpi4py, the path tensor-parallel activations take on CPU)
                under mpirun with one rank per core: time = 2(n-1) * latency + 2(n-1)/n * bytes / GB/s
    parallel    short `hpcllm train` runs of the calibration model (the tiny preset's shape by
                default) in a few layouts, against what the constants above predict for them:
                the terms no micro-benchmark shows (calibrate_runs.py says which run fits which).
                The runs are interleaved, so the machine's drift falls on all.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from itertools import product
from pathlib import Path
from typing import Any

import torch

from hpcllm.planner import profiles
from hpcllm.planner.calibrate_runs import CALIBRATION_MODEL, MeasureLayouts, parallel_terms, shape_text
from hpcllm.planner.step_model import ModelSpec, layer_forward_flops

HIDDEN_SIZES = (64, 128, 256)
SEQUENCE = 128
TOKEN_COUNTS = (128, 512, 2048)  # per micro-batch: the small ones show the fixed costs
LAYERS = (1, 3)
VOCAB = 4096
HEAD_DIM = 32
Times = dict[tuple[int, int, int], float]  # (hidden, tokens, layers): seconds


def _median_seconds(work: Callable[[], Any], seconds: float) -> float:
    work()  # warm-up
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 5:
        tick = time.perf_counter()
        work()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def model_seconds(hidden: int, tokens: int, layers: int, seconds: float) -> float:
    """Median forward + loss + backward time of hpcllm's GPT on `tokens` tokens."""
    from hpcllm.model.gpt import GPT, GPTShape
    from hpcllm.model.heads import lm_loss

    shape = GPTShape(VOCAB, SEQUENCE, layers, n_head=hidden // HEAD_DIM, n_embd=hidden)
    model = GPT(shape, seed=0)
    idx = torch.randint(0, VOCAB, (tokens // SEQUENCE, SEQUENCE))

    def step() -> None:
        lm_loss(model(idx), idx).backward()

    return _median_seconds(step, seconds)


def model_times(
    seconds: float, layer_counts: tuple[int, ...] = LAYERS, together: Callable[[], Any] | None = None
) -> Times:
    """`model_seconds` at every size; `together` (a barrier) before each, so that ranks sharing the
    node time the same size at the same time."""
    times = {}
    for key in product(HIDDEN_SIZES, TOKEN_COUNTS, layer_counts):
        if together is not None:
            together()
        times[key] = model_seconds(*key, seconds)
    return times


def fit(times: Times) -> dict[str, float]:
    """The step model's compute constants from `model_times` (see the module's docstring)."""
    few, many = LAYERS
    block = {(h, t): (times[h, t, many] - times[h, t, few]) / (many - few) for h, t, _ in times}
    rates, overheads = {}, []
    for hidden in HIDDEN_SIZES:
        work = [3 * layer_forward_flops(_spec(hidden), count // SEQUENCE) for count in TOKEN_COUNTS]
        seconds_per_flop, fixed = _line(work, [block[hidden, count] for count in TOKEN_COUNTS], relative=True)
        rates[hidden] = 1 / max(seconds_per_flop, 1e-15)
        overheads.append(fixed)
    xs, ys = [1 / h for h in rates], [1 / r for r in rates.values()]
    slope, intercept = _line(xs, ys)
    if intercept <= 0 or slope < 0:  # the rate did not grow with the hidden size: take it as flat
        intercept, slope = statistics.median(ys), 0.0
    sustained, half = 1 / intercept, slope / intercept

    # Outside the block: the projection's FLOPs at the rate of large GEMMs (it is one, as wide as
    # the vocabulary), over its measured time.
    head = [3 * 2 * t * h * VOCAB / sustained for h, t in block]
    outside = [times[h, t, few] - few * block[h, t] for h, t in block]
    inverse_efficiency, fixed = _line(head, outside, relative=True)
    return {
        "sustained_flops": sustained,
        "half_size": half,
        "layer_overhead_s": max(0.0, statistics.median(overheads)),
        "head_efficiency": 1 / max(inverse_efficiency, 1e-3),
        "micro_batch_overhead_s": max(0.0, fixed),
    }


def _spec(hidden: int) -> ModelSpec:
    return ModelSpec(n_layer=1, n_embd=hidden, n_head=hidden // HEAD_DIM, block_size=SEQUENCE, vocab=1)


def _line(xs: list[float], ys: list[float], relative: bool = False) -> tuple[float, float]:
    """Least-squares slope and intercept; `relative` weighs each point by 1/y^2, so that small
    values (latencies) count as much as large ones."""
    w = [1 / y**2 if relative else 1.0 for y in ys]
    total = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs, strict=True)) / total
    my = sum(wi * y for wi, y in zip(w, ys, strict=True)) / total
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs, strict=True))
    sxy = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, xs, ys, strict=True))
    slope = sxy / sxx if sxx else 0.0
    return slope, my - slope * mx


def memory_gbps(seconds: float) -> float:
    a = torch.randn(16 << 20)  # 64 MB, far beyond the caches
    out = torch.empty_like(a)
    median = _median_seconds(lambda: torch.add(a, a, out=out), seconds)
    return 3 * a.numel() * 4 / median / 1e9  # read twice, write once


def allreduce_rows(ranks: int) -> list[dict[str, Any]]:
    """`hpcllm bench allreduce` with mpi4py under mpirun, one rank per core."""
    from hpcllm.cluster.launcher import launch_command, run_launched

    command = launch_command(ranks, "mpirun") + [sys.executable, "-m", "hpcllm.cli", "bench", "allreduce"]
    command += ["--engines", "mpi4py", "--min-bytes", "4096", "--max-bytes", str(4 << 20), "--factor", "4"]
    out = run_launched(command + ["--json"], "the allreduce benchmark", timeout=600)
    return json.loads(out[out.index("[") :])


def fit_allreduce(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(GB/s, latency in µs) of the ring model 2(n-1) * latency + 2(n-1)/n * bytes / GB/s."""
    n = rows[0]["ranks"]
    xs = [2 * (n - 1) / n * r["bytes"] for r in rows]
    ys = [r["time_us"] * 1e-6 for r in rows]
    slope, intercept = _line(xs, ys, relative=True)
    return 1 / max(slope, 1e-15) / 1e9, max(0.0, intercept / (2 * (n - 1)) * 1e6)


def _ranks_model_times(ranks: int, seconds: float) -> Times:
    """`model_times` of one single-threaded rank per core, all at once (the slowest rank's)."""
    from hpcllm.cluster.launcher import launch_command, launch_env, run_launched

    command = launch_command(ranks, "mpirun") + [sys.executable, "-m", __name__, str(seconds)]
    env = launch_env() | {"OMP_NUM_THREADS": "1"}
    out = run_launched(command, "the per-core GPT benchmark", env, timeout=900)
    rows = json.loads(out.strip().splitlines()[-1])
    return {(h, t, n): v for h, t, n, v in rows}


def _gpt_times(cores: int, seconds: float, say: Callable[[str], None]) -> tuple[dict, dict]:
    """GPT forward + backward seconds by (hidden, tokens, layers): a rank per core, and one rank."""
    say(f"GPT forward + backward, one rank per core ({cores} ranks under mpirun) ...")
    per_core = _ranks_model_times(cores, seconds) if cores > 1 else model_times(seconds)
    say(f"GPT forward + backward, one rank on {cores} cores ...")
    whole = model_times(seconds, layer_counts=(LAYERS[0],))
    for (h, t, n), value in per_core.items():
        alone = f" / {whole[h, t, n] * 1e3:.1f}" if (h, t, n) in whole else ""
        say(f"  hidden {h}, {t} tokens, {n} layers: {value * 1e3:.1f}{alone} ms (a rank per core / one rank)")
    return per_core, whole


def calibrate(
    data: Path,
    measure: MeasureLayouts,
    seconds: float = 0.5,
    steps: int = 30,
    repeat: int = 2,
    say: Callable[[str], None] = print,
    shape: dict[str, int] = CALIBRATION_MODEL,
) -> dict[str, Any]:
    """Run the benchmarks on this node's cores and return the profile's fields, with the
    measurements behind them under `measured`; the parallel runs train on `data` for `steps`."""
    from hpcllm.cluster.runtime import usable_cores
    from hpcllm.observe.metrics import measure_matmul_peak

    cores = usable_cores()
    torch.set_num_threads(cores)
    say(f"matmul peak on {cores} cores ...")
    peak = measure_matmul_peak(torch.device("cpu"), seconds=2 * seconds)
    per_core, whole = _gpt_times(cores, seconds, say)
    constants = fit(per_core)
    efficiency = statistics.median(per_core[key] / (cores * whole[key]) for key in whole)
    say("memory bandwidth ...")
    bandwidth = memory_gbps(seconds)
    ranks = max(2, cores)
    say(f"allreduce (mpi4py, {ranks} ranks under mpirun) ...")
    rows = allreduce_rows(ranks)
    gbps, latency = fit_allreduce(rows)
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    values = {
        "name": profiles.LOCAL,
        "gpus_per_node": cores,
        "cores_per_node": cores,
        "memory_gib": round(memory_gib, 1),
        "peak_flops": peak,
        "gemm_efficiency": cores * constants["sustained_flops"] / peak,
        "gemm_half_size": constants["half_size"],
        "layer_overhead_us": constants["layer_overhead_s"] * 1e6,
        "head_efficiency": constants["head_efficiency"],
        "micro_batch_overhead_us": constants["micro_batch_overhead_s"] * 1e6,
        "thread_efficiency": efficiency,
        "memory_gbps": bandwidth,
        "intra_node_gbps": gbps,
        "inter_node_gbps": gbps,
        "intra_node_latency_us": latency,
        "inter_node_latency_us": latency,
        "collective_efficiency": 1.0,
        "dp_overlap": 0.0,
        "activation_bytes": 4,
        "calibration_model": shape_text(shape),
        "measured": {
            "gpt_seconds_a_rank_per_core": {f"h{h}_t{t}_l{n}": v for (h, t, n), v in per_core.items()},
            "gpt_seconds_one_rank": {f"h{h}_t{t}_l{n}": v for (h, t, n), v in whole.items()},
            "allreduce_us": {r["bytes"]: r["time_us"] for r in rows},
        },
    }
    say("parallel layouts: short `hpcllm train` runs of the calibration model ...")
    terms, measured = parallel_terms(values, data, measure, steps, repeat, cores, shape)
    values.update(terms)
    values["measured"]["train_tokens_per_s"] = measured
    return values


COMMENTS = {
    "gpus_per_node": "ranks a node runs by default: one per core",
    "cores_per_node": "the node's ranks share these cores (the ones this process may use)",
    "memory_gib": "the node's RAM",
    "peak_flops": "fp32 matmul 1024^3 on all cores (the MFU denominator)",
    "gemm_efficiency": "fitted: GPT blocks' forward+backward rate, a rank per core, at large sizes / peak",
    "head_efficiency": "fitted: the vocabulary projection and loss, against the large-GEMM rate",
    "micro_batch_overhead_us": "fitted: fixed time per micro-batch outside the blocks",
    "gemm_half_size": "fitted: the hidden size at which a block reaches half that rate",
    "layer_overhead_us": "fitted: fixed time per block and micro-batch (operator dispatch)",
    "thread_efficiency": "fitted: hpcllm train, one rank on all cores against a rank per core",
    "step_scale": "hpcllm train, dp on every core: measured / predicted step (the loop, data, hooks)",
    "tp_collective_us": "fitted: hpcllm train, tp=2: per TP collective beyond the ring model",
    "pp_micro_batch_us": "fitted: hpcllm train, pp=2, many micro-batches: per micro-batch and stage",
    "oversubscribed_efficiency": "fitted: hpcllm train, dp on twice the cores: rate kept per doubling",
    "bubble_fill": "fitted: hpcllm train, pp=2 on twice the cores: share of the bubble others use",
    "memory_gbps": "elementwise add over 64 MB on all cores",
    "intra_node_gbps": "fitted to mpi4py allreduce, 4 KB .. 4 MB (ring model)",
    "inter_node_gbps": "one node: not measured, the same as inside it",
    "intra_node_latency_us": "fitted: per ring step",
    "inter_node_latency_us": "one node: not measured, the same as inside it",
    "collective_efficiency": "the bandwidth above is the achieved one",
    "dp_overlap": "on CPU the gradient reduction competes with backward for the same cores",
    "activation_bytes": "hpcllm trains in fp32 on CPU",
}


def write(values: dict[str, Any], path: Path) -> Path:
    """The profile as commented YAML; written to a temporary file first, so an interrupted run
    leaves the previous profile whole."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# This machine ({platform.node()}, {platform.processor() or platform.machine()}), measured by "
        f"`hpcllm plan calibrate` on {stamp}",
        f"# with torch {torch.__version__}. Run it again after changing the machine or the software.",
    ]
    for key, value in values.items():
        if key == "measured":
            continue
        text = value if isinstance(value, str) else f"{value:.6g}"
        lines.append(f"{key}: {text}".ljust(40) + (f"# {COMMENTS[key]}" if key in COMMENTS else ""))
    lines.append("# measured (seconds per forward + loss + backward; µs per allreduce by bytes):")
    lines += [f"#   {line}" for line in json.dumps(values["measured"]).split("\n")]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".yaml.partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)
    profiles.load(str(path))  # what we wrote loads
    return path


def _main() -> None:
    """Under mpirun: every rank times the GPT blocks at once; rank 0 prints the slowest times."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    times = model_times(float(sys.argv[1]), together=comm.Barrier)
    slowest = comm.reduce([[h, t, n, v] for (h, t, n), v in times.items()], op=_slowest)
    if comm.rank == 0:
        print(json.dumps(slowest))


def _slowest(a: list[list[float]], b: list[list[float]], _: Any = None) -> list[list[float]]:
    return [[*key, max(x, y)] for (*key, x), (*_, y) in zip(a, b, strict=True)]


if __name__ == "__main__":
    _main()
