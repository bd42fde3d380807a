"""Every layout of a model on a cluster's GPUs, predicted, the ones that fit memory ranked by tokens/s."""

from __future__ import annotations

from itertools import product

from hpcllm.errors import UsageError
from hpcllm.planner.profiles import ClusterProfile
from hpcllm.planner.step_model import Layout, ModelSpec, Prediction, predict

MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTE = ("none", "selective", "full")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(model: ModelSpec, gpus: int, gpus_per_node: int, global_batch: int) -> list[Layout]:
    """Layouts hpcllm can run: tp inside a node and dividing the heads, pp at most the layers,
    dp dividing the batch into whole micro-batches."""
    layouts = []
    for tp, pp in product(_divisors(gpus), _divisors(gpus)):
        if gpus % (tp * pp) or tp > gpus_per_node or model.n_head % tp or pp > model.n_layer:
            continue
        dp = gpus // (tp * pp)
        for micro, zero, recompute in product(MICRO_BATCHES, (0, 1, 2), RECOMPUTE):
            if global_batch % (dp * micro) or (zero and dp == 1):
                continue
            for sequence_parallel in (False, True) if tp > 1 and model.block_size % tp == 0 else (False,):
                layouts.append(Layout(tp, pp, dp, micro, zero, recompute, sequence_parallel))
    return layouts


def ranked(
    model: ModelSpec, cluster: ClusterProfile, nodes: int, gpus_per_node: int, global_batch: int
) -> list[Prediction]:
    """The predictions of every candidate that fits memory, fastest first; none fitting is one
    UsageError that says how far the smallest one is."""
    gpus = nodes * gpus_per_node
    predictions = [
        predict(model, layout, cluster, global_batch)
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
