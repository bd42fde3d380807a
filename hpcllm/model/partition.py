"""Cutting a model for tensor parallelism by its family's plan (`ModelFamily.tensor_parallel_plan`):
each Linear and Embedding the plan names is replaced, in place, by its tensor-parallel counterpart
holding this TP rank's slice of the full, seeded weights, so a TP run starts from exactly the
single-process model. The split of each slice is the one its new layer declares
(hpcllm.parallel.sharding), so the cut here and the checkpoint's join cannot disagree. Nothing
here knows a module's name but through the plan.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from hpcllm.model.family import COLUMN, ROW, TIED_HEAD, VOCAB, VOCAB_HEAD, TensorSplit
from hpcllm.model.registry import family_of_shape
from hpcllm.parallel.pipeline.partition import StagePlan
from hpcllm.parallel.sharding import padded_size
from hpcllm.parallel.tensor.collectives import TensorCollectives
from hpcllm.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    vocab_start,
)

log = logging.getLogger("hpcllm.model")


def _split_of(name: str, plan: dict[str, TensorSplit]) -> TensorSplit | None:
    """The plan's entry for a module: by its whole name, or inside a block (`blocks.N.<name>`)."""
    if name in plan:
        return plan[name]
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks":
        return plan.get(".".join(parts[2:]))
    return None


def _parallel_layer(
    module: nn.Module, split: TensorSplit, group: TensorCollectives, vocab_size: int
) -> nn.Module:
    if split.kind == TIED_HEAD:  # logits through the vocabulary-parallel embedding's slice
        return VocabParallelHead(group, vocab_start(vocab_size, group), vocab_size)
    if split.kind == VOCAB_HEAD and isinstance(module, nn.Linear):
        return VocabParallelHead.from_full(module, group)
    if split.kind == COLUMN and isinstance(module, nn.Linear):
        return ColumnParallelLinear.from_full(module, group, blocks=split.blocks or 1)
    if split.kind == ROW and isinstance(module, nn.Linear):
        return RowParallelLinear.from_full(module, group)
    if split.kind == VOCAB and isinstance(module, nn.Embedding):
        return VocabParallelEmbedding.from_full(module, group)
    raise TypeError(f"the tensor-parallel plan says {split.kind} for a {type(module).__name__}")


def partition_tensor_parallel(
    model: nn.Module, group: TensorCollectives, sequence_parallel: bool = False
) -> nn.Module:
    """Replace the model's layers by this TP rank's partitions, in place; with `sequence_parallel`
    the residual stream between them holds this rank's part of the sequence (Megatron-SP): the
    column-parallel layers gather the sequence, the row-parallel ones reduce-scatter it."""
    tp = group.size
    if tp == 1:
        return model
    shape = model.shape
    vocab_rows = padded_size(shape.vocab_size, tp)
    if vocab_rows != shape.vocab_size:
        log.info(
            "vocabulary padded from %d to %d so that it divides by tp = %d", shape.vocab_size, vocab_rows, tp
        )
    family = family_of_shape(shape)
    plan = family.tensor_parallel_plan(shape)
    chosen = [(name, split) for name, _ in model.named_modules() if (split := _split_of(name, plan))]
    for name, split in chosen:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(
            parent, attribute, _parallel_layer(getattr(parent, attribute), split, group, shape.vocab_size)
        )
    if sequence_parallel:
        model.enable_sequence_parallel(group, family.sequence_parallel_modules())
        for module in model.modules():
            if isinstance(module, ColumnParallelLinear | RowParallelLinear | VocabParallelHead):
                module.sequence_parallel = True
    return model


def plan_stages(shape: Any, pp: int, stage_layers: str = "") -> StagePlan:
    """Layers per pipeline stage, by the shape's family (`ModelFamily.plan_stages`)."""
    return family_of_shape(shape).plan_stages(shape, pp, stage_layers)
