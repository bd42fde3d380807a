"""`hpcllm train --layout auto`: the layout the step model predicts fastest for the world found.

The training configuration keeps its model, global batch and data; the planner chooses tp, pp,
the micro-batch, ZeRO, recomputation and sequence parallelism among the layouts hpcllm can run
with this many ranks, from the calibrated `local` profile, and says why.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from hpcllm.errors import UsageError
from hpcllm.planner import profiles
from hpcllm.planner.search import layout_text, ranked
from hpcllm.planner.step_model import ModelSpec, Prediction

SHOWN = 3  # runners-up written to the log next to the choice


def vocabulary(data_path: str) -> int:
    """The prepared data's vocabulary, or the default tokenizer's when it is yet to be prepared."""
    from hpcllm.data.tokenizer import DEFAULT_VOCAB_SIZE

    manifest = Path(data_path) / "manifest.json"
    if manifest.is_file():
        return int(json.loads(manifest.read_text())["tokenizer"]["vocab_size"])
    return DEFAULT_VOCAB_SIZE


def choose(config: Any, world: int, ranks_per_node: int, vocab: int) -> tuple[Any, list[str]]:
    """`config` with the fastest predicted layout for `world` ranks, `ranks_per_node` to a node,
    and the lines that explain the choice."""
    cluster = profiles.load(profiles.LOCAL)
    m = config.model
    model = ModelSpec(m.n_layer, m.n_embd, m.n_head, m.block_size, vocab)
    nodes = -(-world // ranks_per_node)
    if nodes * ranks_per_node != world:
        raise UsageError(f"--layout auto: {world} ranks do not fill nodes of {ranks_per_node} evenly")
    options = ranked(model, cluster, nodes, ranks_per_node, config.train.global_batch)
    best = options[0]
    layout = best.layout
    chosen = replace(
        config,
        parallel=replace(
            config.parallel,
            tp=layout.tp,
            pp=layout.pp,
            zero=layout.zero,
            sequence_parallel=layout.sequence_parallel,
        ),
        train=replace(config.train, micro_batch=layout.micro_batch, recompute=layout.recompute),
    )
    lines = [
        f"layout auto: {layout_text(layout)}, the fastest of {len(options)} layouts that fit "
        f"{world} ranks ({cluster.name} profile, {cluster.memory_gib:g} GiB per rank): {_why(best)}"
    ]
    lines += [f"  runner-up {layout_text(p.layout)}: {_why(p)}" for p in options[1:SHOWN]]
    return chosen, lines


def _why(prediction: Prediction) -> str:
    b = prediction.breakdown
    terms = ("compute_s", "tp_s", "pp_p2p_s", "bubble_s", "dp_exposed_s", "zero_gather_s", "optimizer_s")
    shown = ", ".join(f"{name[:-2]} {b[name] * 1e3:.0f}" for name in terms if b.get(name, 0) >= 5e-4)
    return (
        f"predicted {prediction.tokens_per_s:,.0f} tokens/s, {prediction.step_s * 1e3:.0f} ms a step "
        f"({shown} ms), {prediction.memory_gib_per_rank:.2f} GiB per rank"
    )
