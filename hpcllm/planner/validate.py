"""`hpcllm plan validate`: the step model against this machine.

Every layout is run by `hpcllm bench train` (its layout variants: real `hpcllm train` runs under
mpirun, tokens/s per 10-step interval after warm-up, layouts interleaved and repeated; the command
line does the running) and predicted from a cluster profile (the calibrated `local` one by
default). Reported: the error of every prediction, their median absolute error, the Spearman rank
correlation of predicted and measured tokens/s, and whether the layout predicted fastest is among
the two measured fastest.

This machine's speed drifts (a shared VM: the same run differs by up to 2x an hour apart), so a
profile calibrated in a slow hour could predict a fast one too slow, all layouts alike. Validation
therefore also runs the calibration's reference run (its model on every core, not one of the
validated layouts) interleaved with the layouts, and reports the errors once more with
`step_scale` re-fitted to it (the one term that stands for "how fast is this machine now"). The
figures that count are the profile's own; the re-anchored ones tell drift from model error.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from hpcllm.cluster.runtime import usable_cores
from hpcllm.planner.calibrate_runs import CALIBRATION_BATCH, calibration_layouts, shape_of
from hpcllm.planner.profiles import ClusterProfile
from hpcllm.planner.search import PlannedLayout, layout_arguments, layout_text, parse_layout
from hpcllm.planner.step_model import ModelSpec, predict

# Runnable on a 2-core machine in a few minutes each round: dp, tp and pp up to 8 ranks, their
# combinations, micro-batch sizes, recomputation, ZeRO and sequence parallelism.
LAYOUTS = (
    "tp=1,pp=1,dp=1,micro_batch=8",
    "tp=1,pp=1,dp=1,micro_batch=2",
    "tp=1,pp=1,dp=2,micro_batch=8",
    "tp=1,pp=1,dp=2,micro_batch=2",
    "tp=1,pp=1,dp=2,micro_batch=8,recompute=full",
    "tp=1,pp=1,dp=2,micro_batch=8,zero=1",
    "tp=2,pp=1,dp=1,micro_batch=8",
    "tp=2,pp=1,dp=1,micro_batch=8,sequence_parallel=true",
    "tp=1,pp=2,dp=1,micro_batch=8",
    "tp=1,pp=2,dp=1,micro_batch=2",
    "tp=1,pp=1,dp=4,micro_batch=8",
    "tp=4,pp=1,dp=1,micro_batch=8",
    "tp=1,pp=4,dp=1,micro_batch=8",
    "tp=2,pp=1,dp=2,micro_batch=4",
    "tp=1,pp=2,dp=2,micro_batch=8",
    "tp=2,pp=2,dp=1,micro_batch=8",
    "tp=1,pp=1,dp=8,micro_batch=4",
    "tp=2,pp=2,dp=2,micro_batch=4",
)
MEDIAN_ERROR_TARGET = 0.15
SPEARMAN_TARGET = 0.8


REFERENCE = "reference: the calibration model on every core"


def reference_run(cluster: ClusterProfile) -> tuple[str, int, list[str]]:
    """(name, ranks, `hpcllm train` flags) of the calibration's reference run, as bench train runs it."""
    layout = _reference_layout()
    model = [f"model.{key}={value}" for key, value in shape_of(cluster).items()]
    sets = [*model, f"train.global_batch={CALIBRATION_BATCH}"]
    return REFERENCE, layout.gpus, layout_arguments(layout) + [a for s in sets for a in ("--set", s)]


def _reference_layout() -> PlannedLayout:
    return calibration_layouts(usable_cores())["reference"]


def anchored(cluster: ClusterProfile, vocab: int, reference_tokens_per_s: float) -> ClusterProfile:
    """`cluster` with `step_scale` re-fitted to the reference run measured now."""
    layout = _reference_layout()
    model = ModelSpec(vocab=vocab, **shape_of(cluster))
    predicted = predict(model, layout, cluster, CALIBRATION_BATCH, ranks_per_node=layout.gpus).step_s
    measured = CALIBRATION_BATCH * model.block_size / reference_tokens_per_s
    return dataclasses.replace(cluster, step_scale=cluster.step_scale * measured / predicted)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (ties get their average rank)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else 0.0


def fitted_layouts(cluster: ClusterProfile, shape: dict[str, int], global_batch: int) -> set[str]:
    """The layouts whose runs the profile's parallel terms were fitted to, when it was calibrated on
    this model shape and batch: their rows are in-sample, and counted apart."""
    if shape_of(cluster) != shape or global_batch != CALIBRATION_BATCH:
        return set()
    return {layout_text(layout) for layout in calibration_layouts(usable_cores()).values()}


def _statistics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    predicted = [r["predicted_tokens_per_s"] for r in rows]
    actual = [r["measured_tokens_per_s"] for r in rows]
    best_predicted = max(rows, key=lambda r: r["predicted_tokens_per_s"])
    measured_top2 = sorted(rows, key=lambda r: -r["measured_tokens_per_s"])[:2]
    return {
        "layouts": len(rows),
        "median_abs_error": statistics.median(abs(r["error"]) for r in rows),
        "spearman": spearman(predicted, actual),
        "predicted_best": best_predicted["layout"],
        "measured_top2": [r["layout"] for r in measured_top2],
        "best_in_top2": best_predicted in measured_top2,
    }


def compare(
    model: ModelSpec,
    cluster: ClusterProfile,
    global_batch: int,
    measured: dict[str, float],
    fitted: set[str] | None = None,
) -> dict:
    """Predictions for {layout text: measured tokens/s} on one node, and the statistics: over all
    rows, and over the rows the calibration did not fit (`held_out`) when some were fitted."""
    rows = []
    for text, tokens_per_s in measured.items():
        layout = parse_layout(text, global_batch)
        prediction = predict(model, layout, cluster, global_batch, ranks_per_node=layout.gpus)
        rows.append(
            {
                "layout": text,
                "ranks": layout.gpus,
                "measured_tokens_per_s": tokens_per_s,
                "predicted_tokens_per_s": prediction.tokens_per_s,
                "error": prediction.tokens_per_s / tokens_per_s - 1,
                "fitted": layout_text(layout) in (fitted or set()),
                "breakdown": prediction.breakdown,
            }
        )
    result = {"rows": rows, **_statistics(rows)}
    held_out = [r for r in rows if not r["fitted"]]
    if len(held_out) < len(rows) and len(held_out) >= 2:
        result["held_out"] = _statistics(held_out)
    return result


def render(result: dict[str, Any]) -> str:
    width = max(len(r["layout"]) for r in result["rows"])
    header = f"{'ranks':>5} {'measured tok/s':>14} {'min-max':>13} {'predicted':>10} {'error':>7}"
    lines = [f"{'layout':<{width}} {header}"]
    for r in result["rows"]:
        lines.append(
            f"{r['layout']:<{width}} {r['ranks']:>5} {r['measured_tokens_per_s']:>14,.0f} "
            f"{r.get('min', 0):>6,.0f}-{r.get('max', 0):<6,.0f} {r['predicted_tokens_per_s']:>10,.0f} "
            f"{r['error']:>+7.1%}" + ("  (fitted by the calibration)" if r.get("fitted") else "")
        )
    if "anchored" in result:
        again, scale = result["anchored"], result["step_scale"]
        lines.append(
            f"with step_scale re-anchored to the reference run measured now ({scale['calibrated']:.2f} -> "
            f"{scale['now']:.2f}): median absolute error {again['median_abs_error']:.1%}, "
            f"Spearman {again['spearman']:.3f}"
        )
    if "held_out" in result:
        held = result["held_out"]
        lines.append(
            f"the {held['layouts']} layouts the calibration did not fit: median absolute error "
            f"{held['median_abs_error']:.1%}, Spearman {held['spearman']:.3f}, predicted best "
            f"{held['predicted_best']} {'is' if held['best_in_top2'] else 'is NOT'} among their two "
            "measured best"
        )
    lines += [
        f"all {result['layouts']}: median absolute error {result['median_abs_error']:.1%} "
        f"(target <= {MEDIAN_ERROR_TARGET:.0%}), "
        f"Spearman {result['spearman']:.3f} (target >= {SPEARMAN_TARGET}), predicted best "
        f"{result['predicted_best']} {'is' if result['best_in_top2'] else 'is NOT'} among the measured "
        f"two best ({'; '.join(result['measured_top2'])})"
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Predicted against measured tokens/s, with the line of perfect prediction and the ±15% band."""
    from hpcllm.observe import plots

    fig, ax = plots.figure(width=7, height=6)
    measured = [r["measured_tokens_per_s"] for r in result["rows"]]
    predicted = [r["predicted_tokens_per_s"] for r in result["rows"]]
    top = 1.1 * max(measured + predicted)
    ax.plot([0, top], [0, top], color="black", linewidth=1, label="predicted = measured")
    band = MEDIAN_ERROR_TARGET
    ax.fill_between([0, top], [0, top * (1 - band)], [0, top * (1 + band)], alpha=0.15, label=f"±{band:.0%}")
    fitted = [bool(r.get("fitted")) for r in result["rows"]]
    for kind, marker in ((False, "o"), (True, "s")):
        xs = [m for m, f in zip(measured, fitted, strict=True) if f == kind]
        ys = [p for p, f in zip(predicted, fitted, strict=True) if f == kind]
        if xs:
            label = "fitted by the calibration" if kind else "held out"
            ax.scatter(xs, ys, marker=marker, zorder=3, label=label)
    for r in result["rows"]:
        short = r["layout"].replace("micro_batch", "mb").replace("sequence_parallel=true", "sp")
        ax.annotate(short, (r["measured_tokens_per_s"], r["predicted_tokens_per_s"]), fontsize=6)
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="measured tokens/s", ylabel="predicted tokens/s")
    ax.set_title(
        f"{result['cluster']} profile: median |error| {result['median_abs_error']:.1%}, "
        f"Spearman {result['spearman']:.3f}"
    )
    plots.save(fig, path)
