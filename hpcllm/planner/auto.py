"""`hpcllm train --layout auto`: the layout the step model predicts fastest for the world found.

The training configuration keeps its model, global batch and data; the planner chooses tp, pp,
the micro-batch, ZeRO, recomputation and sequence parallelism among the layouts hpcllm can run
with this many ranks, from the calibrated `local` profile, and says why; the choice goes back into
the configuration as assignments, as if given with --set.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcllm.errors import UsageError
from hpcllm.planner.profiles import ClusterProfile
from hpcllm.planner.search import layout_settings, layout_text, ranked
from hpcllm.planner.step_model import ModelSpec, PlannedLayout, Prediction

SHOWN = 3  # runners-up written to the log next to the choice


def vocabulary(data_path: str) -> int:
    """The prepared data's vocabulary, or the default tokenizer's when it is yet to be prepared."""
    from hpcllm.data.tokenizer import DEFAULT_VOCAB_SIZE
    from hpcllm.data.tokens import open_prepared

    if (Path(data_path) / "manifest.json").is_file():
        return open_prepared(Path(data_path), verify=False).vocab_size
    return DEFAULT_VOCAB_SIZE


def choose(
    config: Any,
    cluster: ClusterProfile,
    world: int,
    ranks_per_node: int,
    vocab: int,
    problem: Callable[[PlannedLayout], str | None] = lambda layout: None,
) -> tuple[list[str], list[str]]:
    """The fastest predicted layout of `config`'s model for `world` ranks, `ranks_per_node` to a
    node, as configuration assignments (key=value), and the lines that explain the choice.
    `problem` says why the run's other settings cannot run a layout (None: they can)."""
    m = config.model
    model = ModelSpec.of_model(m, vocab)
    nodes = -(-world // ranks_per_node)
    if nodes * ranks_per_node != world:
        raise UsageError(f"--layout auto: {world} ranks do not fill nodes of {ranks_per_node} evenly")
    fitting = ranked(model, cluster, nodes, ranks_per_node, config.train.global_batch)
    options = [p for p in fitting if problem(p.layout) is None]
    if not options:
        raise UsageError(
            f"--layout auto: every layout that fits is one the run cannot take: {problem(fitting[0].layout)}"
        )
    best = options[0]
    layout = best.layout
    lines = [
        f"layout auto: {layout_text(layout)}, the fastest of {len(options)} layouts that fit "
        f"{world} ranks ({cluster.name} profile, {cluster.memory_gib:g} GiB per rank): {_why(best)}"
    ]
    lines += [f"  runner-up {layout_text(p.layout)}: {_why(p)}" for p in options[1:SHOWN]]
    return layout_settings(layout), lines


def _why(prediction: Prediction) -> str:
    b = prediction.breakdown
    terms = ("compute_s", "tp_s", "pp_p2p_s", "bubble_s", "dp_exposed_s", "zero_gather_s", "optimizer_s")
    shown = ", ".join(f"{name[:-2]} {b[name] * 1e3:.0f}" for name in terms if b.get(name, 0) >= 5e-4)
    return (
        f"predicted {prediction.tokens_per_s:,.0f} tokens/s, {prediction.step_s * 1e3:.0f} ms a step "
        f"({shown} ms), {prediction.memory_gib_per_rank:.2f} GiB per rank"
    )
