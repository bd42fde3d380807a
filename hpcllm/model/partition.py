"""Partitioning the GPT: its layers per pipeline stage (`plan_stages`), and for tensor parallelism
each Linear and the embedding replaced, in place, by
its tensor-parallel counterpart holding this TP rank's slice of the full, seeded weights, so a TP
run starts from exactly the single-process model. The split of each slice is the one its new layer
declares (hpcllm.parallel.sharding), so the cut here and the checkpoint's join cannot disagree.
"""

from __future__ import annotations

import logging

from torch import nn

from hpcllm.errors import UsageError
from hpcllm.model.gpt import GPT, Block, GPTShape
from hpcllm.parallel.pipeline.partition import StagePlan, balanced_stages, parse_stage_layers
from hpcllm.parallel.sharding import padded_size
from hpcllm.parallel.tensor.collectives import TensorCollectives
from hpcllm.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
)

log = logging.getLogger("hpcllm.model")


def check_tp(n_head: int, n_embd: int, tp: int) -> None:
    if n_head % tp:
        raise UsageError(f"model.n_head {n_head} is not divisible by tp {tp}: attention is split by heads")
    if (4 * n_embd) % tp:
        raise UsageError(f"the MLP width 4 × n_embd = {4 * n_embd} is not divisible by tp {tp}")


def partition_tensor_parallel(model: GPT, group: TensorCollectives, sequence_parallel: bool = False) -> GPT:
    """Replace the model's layers by this TP rank's partitions, in place; with `sequence_parallel`
    the residual stream between them holds this rank's part of the sequence (Megatron-SP): the
    column-parallel layers gather the sequence, the row-parallel ones reduce-scatter it."""
    tp = group.size
    if tp == 1:
        return model
    shape = model.shape
    check_tp(shape.n_head, shape.n_embd, tp)
    vocab_rows = padded_size(shape.vocab_size, tp)
    if vocab_rows != shape.vocab_size:
        log.info(
            "vocabulary padded from %d to %d so that it divides by tp = %d", shape.vocab_size, vocab_rows, tp
        )
    for block in model.blocks:
        if not isinstance(block, Block):  # a layer of another pipeline stage
            continue
        attn, mlp = block.attn, block.mlp
        attn.qkv = ColumnParallelLinear.from_full(attn.qkv, group, blocks=3)  # q, k, v each split by head
        attn.proj = RowParallelLinear.from_full(attn.proj, group)
        attn.n_head = shape.n_head // tp
        mlp.fc = ColumnParallelLinear.from_full(mlp.fc, group)
        mlp.proj = RowParallelLinear.from_full(mlp.proj, group)
    if isinstance(model.wte, nn.Embedding):  # the first and the last stage
        model.wte = VocabParallelEmbedding.from_full(model.wte, group)
        model.lm_head = VocabParallelHead(group, model.wte.start, shape.vocab_size)
    if sequence_parallel:
        model.sequence_group = group
        for module in model.modules():
            if isinstance(module, ColumnParallelLinear | RowParallelLinear | VocabParallelHead):
                module.sequence_parallel = True
    return model


def plan_stages(shape: GPTShape, pp: int, stage_layers: str = "") -> StagePlan:
    """Layers per stage: as `stage_layers` says, or balanced by parameter count (the token
    embedding counts on the first stage, the final norm and the tied head on the last)."""
    if stage_layers:
        return StagePlan(parse_stage_layers(stage_layers, shape.n_layer, pp))
    d = shape.n_embd
    embed = (shape.vocab_size + shape.block_size) * d
    head = shape.vocab_size * d + 2 * d
    return StagePlan(balanced_stages([shape.block_parameters] * shape.n_layer, embed, head, pp))
