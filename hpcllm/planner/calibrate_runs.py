"""The parallel terms of a `local` profile, fitted from short `hpcllm train` runs.

`plan calibrate` first measures kernels (calibrate.py); what those miss of a real step (the
training loop, the schedules, ranks sharing cores) is fitted here from training runs of the
calibration model in a few layouts, each term from the run that shows it most: dp on every core
(`step_scale`), pp = 2 with many micro-batches (`pp_micro_batch_us`), one rank on all cores
(`thread_efficiency`), tp = 2 (`tp_collective_us`), dp on twice the cores
(`oversubscribed_efficiency`) and pp = 2 on twice the cores (`bubble_fill`). `plan validate` runs
the same reference layout to tell the machine's drift from the model's error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcllm.planner import profiles
from hpcllm.planner.step_model import ModelSpec, PlannedLayout, predict

# Runs hpcllm train in layouts: ([(name, ranks, train flags)], common flags, steps, repeat) -> tokens/s
# by name. The command line passes `hpcllm bench train`'s, so that the planner does not import it.
MeasureLayouts = Callable[[list[tuple[str, int, list[str]]], list[str], int, int], dict[str, float]]
# The training runs' model, by default the tiny preset's shape (`plan calibrate --model` takes
# another): the loop's own costs that `step_scale` stands for do not scale like the kernels, so
# they are measured on the shape the profile is for.
CALIBRATION_MODEL = {"n_layer": 4, "n_embd": 128, "n_head": 4, "block_size": 128}
CALIBRATION_BATCH = 32


def calibration_layouts(cores: int) -> dict[str, PlannedLayout]:
    """The runs behind the parallel terms: on every core, then on twice as many ranks."""
    half = max(1, cores // 2)
    return {
        "reference": PlannedLayout(1, 1, 2 * half, 8),
        "one_rank": PlannedLayout(1, 1, 1, 8),  # all cores' threads in one rank
        "tp": PlannedLayout(2, 1, half, 8),
        "pp": PlannedLayout(1, 2, half, 2),  # many micro-batches: the stages' balance shows, not the bubble
        "crowded": PlannedLayout(1, 1, 4 * half, 8),
        "crowded_pp": PlannedLayout(1, 2, 2 * half, 8),  # few micro-batches: a large bubble
    }


def shape_text(shape: dict[str, int]) -> str:
    return ",".join(f"{key}={value}" for key, value in shape.items())


def shape_of(cluster: profiles.ClusterProfile) -> dict[str, int]:
    """The model shape a profile was calibrated with (older profiles: the shape of their day)."""
    if not cluster.calibration_model:
        return {"n_layer": 4, "n_embd": 64, "n_head": 2, "block_size": 64}
    return {k: int(v) for k, v in (item.split("=") for item in cluster.calibration_model.split(","))}


def _measure_runs(
    layouts: dict[str, PlannedLayout], shape: dict[str, int], measure: MeasureLayouts, steps: int, repeat: int
) -> dict[str, float]:
    """Tokens/s of a short training run of the calibration model in each layout."""
    from hpcllm.planner.search import layout_arguments

    sets = [f"model.{key}={value}" for key, value in shape.items()]
    sets.append(f"train.global_batch={CALIBRATION_BATCH}")
    flags = [item for assignment in sets for item in ("--set", assignment)]
    variants = [(name, layout.gpus, layout_arguments(layout)) for name, layout in layouts.items()]
    return measure(variants, flags, steps, repeat)


def _bisect(
    terms: dict[str, float], term: str, low: float, high: float, too_slow: Callable[[], bool], rising: bool
) -> None:
    """Bisect for the value of `term` at which a run's prediction meets its measurement (`too_slow`:
    the prediction is slower than the run); `rising`: a larger value predicts a slower step."""
    for _ in range(40):
        terms[term] = (low + high) / 2
        low, high = (low, terms[term]) if too_slow() == rising else (terms[term], high)


def parallel_terms(
    values: dict[str, Any],
    data: Path,
    measure: MeasureLayouts,
    steps: int,
    repeat: int,
    cores: int,
    shape: dict[str, int] = CALIBRATION_MODEL,
) -> tuple[dict[str, float], dict[str, float]]:
    """Fit the parallel terms from short training runs of the calibration model, each from its run."""
    from hpcllm.data.tokens import open_prepared

    layouts = calibration_layouts(cores)
    tokens_per_s = _measure_runs(layouts, shape, measure, steps, repeat)
    model = ModelSpec(vocab=open_prepared(data, verify=False).vocab_size, **shape)
    tokens = CALIBRATION_BATCH * model.block_size
    fields = {k: v for k, v in values.items() if k != "measured"}
    terms: dict[str, float] = {}

    def predicted(name: str) -> Any:
        profile = profiles.ClusterProfile(**(fields | terms))
        layout = layouts[name]
        return predict(model, layout, profile, CALIBRATION_BATCH, ranks_per_node=layout.gpus)

    def measured_step(name: str) -> float:
        return tokens / tokens_per_s[name]

    def excess(name: str) -> float:
        """Measured seconds per step beyond the prediction, in the benchmarks' own units."""
        return (measured_step(name) - predicted(name).step_s) / terms["step_scale"]

    def anchor() -> None:
        """step_scale: the machine's pace (the loop, data, hooks), from dp on every core."""
        terms["step_scale"] = 1.0
        terms["step_scale"] = measured_step("reference") / predicted("reference").step_s

    def solve(term: str, low: float, high: float, run: str, rising: bool) -> None:
        _bisect(terms, term, low, high, lambda: predicted(run).step_s > measured_step(run), rising)

    tp, pp = layouts["tp"], layouts["pp"]
    tp_collectives = CALIBRATION_BATCH // (tp.dp * tp.micro_batch) * model.n_layer * 4
    pp_micro_batches = CALIBRATION_BATCH // (pp.dp * pp.micro_batch) + pp.pp - 1
    # Each term from its run, the others in place; they depend on each other a little (the pp run
    # has a small bubble), so the rounds repeat until they settle.
    for _ in range(4):
        anchor()
        terms["pp_micro_batch_us"] = 0.0
        terms["pp_micro_batch_us"] = max(0.0, excess("pp") / pp_micro_batches * 1e6)
        # Threads of one rank against ranks of one thread, from two real runs side by side (the
        # micro-benchmark's ratio is taken minutes apart, and this machine drifts). Above 1 when one
        # rank pays less per operation than ranks that share the cores do.
        solve("thread_efficiency", 0.05, 2.0, "one_rank", rising=False)
        terms["tp_collective_us"] = 0.0
        terms["tp_collective_us"] = max(0.0, excess("tp") / tp_collectives * 1e6)
        solve("oversubscribed_efficiency", 0.1, 1.0, "crowded", rising=False)
        # The fill evens out the stages and shrinks the bubble: the prediction falls as it grows.
        solve("bubble_fill", 0.0, 1.0, "crowded_pp", rising=False)
    return terms, tokens_per_s
