"""Every layout of a model on a cluster's GPUs, predicted, the ones that fit memory ranked by tokens/s."""

from __future__ import annotations

from itertools import product
from typing import Any

from hpcllm.errors import UsageError
from hpcllm.planner.profiles import ClusterProfile
from hpcllm.planner.step_model import ModelSpec, PlannedLayout, Prediction, predict

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
LONG_SEQUENCE = 8192  # the planner considers context parallelism from this sequence length on
RECOMPUTE = ("none", "selective", "full")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(model: ModelSpec, gpus: int, gpus_per_node: int, global_batch: int) -> list[PlannedLayout]:
    """Layouts hpcllm can run: tp inside a node and splitting the model (its family says: heads,
    key/value heads, MLP width), pp at most the layers, cp (for sequences of LONG_SEQUENCE tokens or
    more) cutting the sequence into 2·cp chunks, dp dividing the batch into whole micro-batches."""
    layouts = []
    cps = [
        c
        for c in (1, 2, 4, 8)
        if c == 1 or (model.block_size >= LONG_SEQUENCE and model.block_size % (2 * c) == 0)
    ]
    for tp, pp, cp in product(_divisors(gpus), _divisors(gpus), cps):
        if gpus % (tp * pp * cp) or tp > gpus_per_node or pp > model.n_layer or not model.cuts_over(tp):
            continue
        dp = gpus // (tp * pp * cp)
        for micro, zero, recompute in product(MICRO_BATCHES, (0, 1, 2, 3), RECOMPUTE):
            if global_batch % (dp * micro) or (zero and dp * cp == 1):
                continue
            sequence_parallel = (False, True) if tp > 1 and (model.block_size // cp) % tp == 0 else (False,)
            for sp in sequence_parallel:
                layouts.append(PlannedLayout(tp, pp, dp, micro, zero, recompute, sp, cp=cp))
    return layouts


def ranked(
    model: ModelSpec, cluster: ClusterProfile, nodes: int, gpus_per_node: int, global_batch: int
) -> list[Prediction]:
    """The predictions of every candidate that fits memory, fastest first; none fitting is one
    UsageError that says how far the smallest one is."""
    gpus = nodes * gpus_per_node
    predictions = [
        predict(model, layout, cluster, global_batch, gpus_per_node)
        for layout in candidates(model, gpus, gpus_per_node, global_batch)
    ]
    if not predictions:
        raise UsageError(
            f"no layout divides {gpus} GPUs and a global batch of {global_batch} for this model; "
            "choose a global batch that is a multiple of the GPU count"
        )
    fitting = [p for p in predictions if p.fits]
    if not fitting:
        smallest = min(predictions, key=lambda p: p.memory_gib_per_rank)
        raise UsageError(
            f"the model fits no layout on {gpus} GPUs of {cluster.memory_gib:g} GiB: the smallest needs "
            f"{smallest.memory_gib_per_rank:.1f} GiB per rank (tp={smallest.layout.tp}, "
            f"pp={smallest.layout.pp}); use more nodes or a smaller model"
        )
    # Fastest first; among equals (the micro-batch often changes nothing but memory) the smallest.
    return sorted(fitting, key=lambda p: (-round(p.tokens_per_s, 6), p.memory_gib_per_rank))


def distinct(predictions: list[Prediction]) -> list[Prediction]:
    """The fastest setting (micro-batch, ZeRO, recomputation, sequence parallelism) of each grid
    (tp, pp, dp), in the order given: the choices a user weighs, not ten variants of one."""
    seen: set[tuple[int, int, int]] = set()
    kept = []
    for prediction in predictions:
        grid = (prediction.layout.tp, prediction.layout.pp, prediction.layout.dp)
        if grid not in seen:
            seen.add(grid)
            kept.append(prediction)
    return kept


LAYOUT_KEYS = (
    "tp",
    "pp",
    "dp",
    "cp",
    "micro_batch",
    "zero",
    "recompute",
    "sequence_parallel",
    "shard_group",
    "loss_chunk",
)


def parse_layout(text: str, global_batch: int, gpus: int | None = None) -> PlannedLayout:
    """`tp=8,pp=2[,dp=..,cp=..,micro_batch=..,zero=..,recompute=..,...]` (LAYOUT_KEYS): dp is what is
    left of `gpus`, or given (then `gpus` is tp * pp * cp * dp). Bad text is one UsageError."""
    fields: dict[str, Any] = {"tp": 1, "pp": 1, "micro_batch": 1, "zero": 0}
    for key, value in (item.partition("=")[::2] for item in text.split(",")):
        key, value = key.strip(), value.strip()
        if key in ("tp", "pp", "dp", "cp", "micro_batch", "zero", "loss_chunk"):
            if not value.isdigit():
                raise UsageError(f"--layout: {key} must be an integer, not {value!r}")
            fields[key] = int(value)
        elif key == "recompute" and value in RECOMPUTE:
            fields[key] = value
        elif key == "sequence_parallel" and value in ("true", "false"):
            fields[key] = value == "true"
        elif key == "shard_group" and value in ("world", "node"):
            fields[key] = value
        else:
            raise UsageError(f"--layout: unknown {key}={value}; use {', '.join(LAYOUT_KEYS)}")
    for key in ("tp", "pp", "dp", "cp", "micro_batch"):  # loss_chunk may be 0: the whole head
        if fields.get(key, 1) < 1:
            raise UsageError(f"--layout: {key} must be at least 1, not {fields[key]}")
    tp, pp, cp = fields.pop("tp"), fields.pop("pp"), fields.get("cp", 1)
    if "dp" in fields:
        dp = fields.pop("dp")
        if gpus is not None and tp * pp * cp * dp != gpus:
            named = "tp x pp x cp x dp" if cp > 1 else "tp x pp x dp"
            raise UsageError(f"--layout: {named} = {tp * pp * cp * dp}, but there are {gpus} GPUs")
    else:
        if gpus is None:
            raise UsageError("--layout: give dp as well (tp=..,pp=..,dp=..)")
        if gpus % (tp * pp * cp):
            named = f"tp={tp}, pp={pp}, cp={cp}: tp x pp x cp" if cp > 1 else f"tp={tp}, pp={pp}: tp x pp"
            raise UsageError(f"--layout {named} = {tp * pp * cp} does not divide the {gpus} GPUs")
        dp = gpus // (tp * pp * cp)
    if global_batch % (dp * fields["micro_batch"]):
        raise UsageError(
            f"--layout: the global batch {global_batch} is not a multiple of dp {dp} x micro_batch "
            f"{fields['micro_batch']}"
        )
    return PlannedLayout(tp=tp, pp=pp, dp=dp, **fields)


def layout_text(layout: PlannedLayout) -> str:
    """The short name of a layout, as `parse_layout` reads it (defaults left out)."""
    parts = [f"tp={layout.tp}", f"pp={layout.pp}", f"dp={layout.dp}", f"micro_batch={layout.micro_batch}"]
    if layout.cp > 1:
        parts.append(f"cp={layout.cp}")
    if layout.zero:
        parts.append(f"zero={layout.zero}")
    if layout.recompute != "none":
        parts.append(f"recompute={layout.recompute}")
    if layout.sequence_parallel:
        parts.append("sequence_parallel=true")
    if layout.shard_group != "world":
        parts.append(f"shard_group={layout.shard_group}")
    if layout.loss_chunk:
        parts.append(f"loss_chunk={layout.loss_chunk}")
    return ",".join(parts)


def layout_settings(layout: PlannedLayout) -> list[str]:
    """The configuration assignments (key=value) that run `layout`; dp is what the world leaves."""
    return [
        f"parallel.tp={layout.tp}",
        f"parallel.pp={layout.pp}",
        f"train.micro_batch={layout.micro_batch}",
        f"train.recompute={layout.recompute}",
        f"parallel.zero={layout.zero}",
        f"parallel.sequence_parallel={str(layout.sequence_parallel).lower()}",
        *([f"parallel.shard_group={layout.shard_group}"] if layout.shard_group != "world" else []),
        *([f"train.loss_chunk={layout.loss_chunk}"] if layout.loss_chunk else []),
        *([f"parallel.cp={layout.cp}"] if layout.cp > 1 else []),
    ]


def layout_arguments(layout: PlannedLayout) -> list[str]:
    """`hpcllm train` flags that run `layout`: --tp and --pp as a user writes them, the rest --set."""
    rest = layout_settings(layout)[2:]
    return ["--tp", str(layout.tp), "--pp", str(layout.pp)] + [a for s in rest for a in ("--set", s)]
