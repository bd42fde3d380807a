"""`hpcllm bench pipeline`: the pipeline bubble and activation memory, GPipe against 1F1B.

For pp = 2 and 4 and several micro-batch counts m, each schedule runs a few training steps of a
GPT with 2 layers per stage on random tokens (a small vocabulary, so the stages cost alike).
Per stage it measures

- the idle fraction: time blocked receiving from a neighbour / step time, next to the theory
  (p − 1)/(m + p − 1);
- the peak activation memory: bytes autograd saved for backward and still held, tracked through
  `torch.autograd.graph.saved_tensors_hooks`.

The orchestrator launches one `mpirun -np pp` job per configuration (workers: `python -m
hpcllm.bench.pipeline worker ...`) and collects one JSON line from each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from hpcllm.cluster.launcher import launch_command, run_launched
from hpcllm.observe import plots

MICRO_BATCH = 4
BLOCK = 64
EMBD = 128
VOCAB = 256
LAYERS_PER_STAGE = 2


class _SavedBytes:
    """Bytes of tensors autograd holds for backward, now and at most."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor) -> Any:
        tracker = self

        class Held:
            def __init__(self) -> None:
                self.tensor = tensor
                self.nbytes = tensor.numel() * tensor.element_size()
                tracker.live += self.nbytes
                tracker.peak = max(tracker.peak, tracker.live)

            def __del__(self) -> None:
                tracker.live -= self.nbytes

        return Held()

    @staticmethod
    def unpack(held: Any) -> torch.Tensor:
        return held.tensor


def worker(pp: int, micro: int, schedule: str, steps: int) -> None:
    from hpcllm.batch import Batch
    from hpcllm.cluster import runtime
    from hpcllm.model.gpt import GPT, GPTShape
    from hpcllm.model.partition import plan_stages
    from hpcllm.parallel.grid import Grid
    from hpcllm.parallel.pipeline.schedules import PipelineStage

    rt = runtime.init(seed=0)
    grid = Grid(rt.comm, pp=pp)
    shape = GPTShape(VOCAB, BLOCK, LAYERS_PER_STAGE * pp, n_head=4, n_embd=EMBD)
    layers = plan_stages(shape, pp).layer_range(grid.pp_rank)
    model = GPT(shape, 0, layers, grid.is_first_stage, grid.is_last_stage)
    stage = PipelineStage(model, grid, schedule, (MICRO_BATCH, BLOCK, EMBD), nullcontext, rt.device)
    generator = torch.Generator().manual_seed(0)
    batches = [
        Batch(
            torch.randint(0, VOCAB, (MICRO_BATCH, BLOCK), generator=generator),
            torch.randint(0, VOCAB, (MICRO_BATCH, BLOCK), generator=generator),
        )
        for _ in range(micro)
    ]
    saved = _SavedBytes()
    idle = []
    for step in range(steps + 1):  # the first step warms up
        model.zero_grad()
        rt.comm.Barrier()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            stats = stage.train_step(batches, 1 / (micro * MICRO_BATCH * BLOCK))
        elapsed = time.perf_counter() - start
        if step:
            idle.append(stats.idle_s / elapsed)
    row = {
        "stage": grid.pp_rank,
        "idle": statistics.median(idle),
        "peak_activation_bytes": saved.peak,
        "max_live_micro_batches": stats.max_live_activations,
    }
    rows = rt.comm.gather(row, root=0)
    if rt.rank == 0:
        print(json.dumps({"pp": pp, "m": micro, "schedule": schedule, "stages": rows}))


def run(pps: list[int], micros: list[int], steps: int) -> list[dict[str, Any]]:
    results = []
    for pp in pps:
        for micro in micros:
            for schedule in ("gpipe", "1f1b"):
                command = launch_command(pp, "mpirun") + [
                    sys.executable,
                    "-m",
                    "hpcllm.bench.pipeline",
                    "worker",
                    "--pp",
                    str(pp),
                    "--micro",
                    str(micro),
                    "--schedule",
                    schedule,
                    "--steps",
                    str(steps),
                ]
                out = run_launched(command, f"the pipeline benchmark (pp {pp}, m {micro})", timeout=900)
                result = json.loads(out.strip().splitlines()[-1])
                result["theory"] = (pp - 1) / (micro + pp - 1)
                result["idle_mean"] = statistics.mean(s["idle"] for s in result["stages"])
                result["peak_activation_mb_max"] = (
                    max(s["peak_activation_bytes"] for s in result["stages"]) / 1e6
                )
                results.append(result)
    return results


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        f"GPT with {LAYERS_PER_STAGE} layers per stage, n_embd {EMBD}, block {BLOCK}, "
        f"micro-batch {MICRO_BATCH}",
        f"{'pp':>3} {'m':>3} {'schedule':<8} {'idle (measured)':>16} {'theory':>7} {'peak act. MB':>13} "
        f"{'live micro-batches per stage':>30}",
    ]
    for r in results:
        live = ",".join(str(s["max_live_micro_batches"]) for s in r["stages"])
        lines.append(
            f"{r['pp']:>3} {r['m']:>3} {r['schedule']:<8} {r['idle_mean']:>16.1%} {r['theory']:>7.1%} "
            f"{r['peak_activation_mb_max']:>13.2f} {live:>30}"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    fig, (left, right) = plots.figure(ncols=2, width=11)
    for pp in sorted({r["pp"] for r in results}):
        for schedule, style in (("gpipe", "o-"), ("1f1b", "s--")):
            mine = [r for r in results if r["pp"] == pp and r["schedule"] == schedule]
            ms = [r["m"] for r in mine]
            left.plot(ms, [r["idle_mean"] for r in mine], style, label=f"pp={pp} {schedule} measured")
            right.plot(ms, [r["peak_activation_mb_max"] for r in mine], style, label=f"pp={pp} {schedule}")
        ms = sorted({r["m"] for r in results if r["pp"] == pp})
        left.plot(ms, [(pp - 1) / (m + pp - 1) for m in ms], ":", color="grey", label=f"pp={pp} theory")
    left.set(
        xlabel="micro-batches per step (m)", ylabel="idle fraction", xscale="log", title="pipeline bubble"
    )
    right.set(
        xlabel="micro-batches per step (m)",
        ylabel="peak activation memory per stage (MB)",
        xscale="log",
        title="activations held for backward",
    )
    plots.save(fig, path, legend_size=7)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["worker"])
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--schedule", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    worker(args.pp, args.micro, args.schedule, args.steps)
