"""Tensor parallelism: Megatron-style partitioned layers, and partitioning the GPT in place.

The full GPT is built and initialised from the seed on every rank; `partition_gpt` then replaces
each layer by its partitioned counterpart holding this TP rank's slice, so a TP run starts from
exactly the single-process weights. What each parameter's slice is follows from its name
(`partition_kind`), which is also how checkpoints are resharded between TP sizes:

    qkv      attn.qkv          rows, by attention head within each of q, k and v
    col      mlp.fc            rows (output features), contiguous
    row      attn.proj, mlp.proj   weight columns (input features); the bias is added once, after the reduce
    vocab    wte               rows (vocabulary), padded to a multiple of tp
    replicated   LayerNorms, position embedding, row-parallel biases

Communication goes through hpcllm.parallel.tensor.collectives; this module only computes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpcllm.cluster import watchdog
from hpcllm.errors import UsageError
from hpcllm.model.gpt import GPT
from hpcllm.parallel.tensor.collectives import TensorCollectives, copy_to_region, reduce_from_region

log = logging.getLogger("hpcllm.parallel")


# ---- which slice of a tensor a TP rank holds -----------------------------------------------


def partition_kind(name: str) -> str:
    """The partitioning of the parameter `name` (as in GPT.named_parameters())."""
    if ".attn.qkv." in f".{name}":
        return "qkv"
    if ".mlp.fc." in f".{name}":
        return "col"
    if name.endswith("proj.weight"):
        return "row"
    if name == "wte.weight":
        return "vocab"
    return "replicated"


def padded_vocab(vocab_size: int, tp: int) -> int:
    return math.ceil(vocab_size / tp) * tp


def shard(full: torch.Tensor, kind: str, rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of the full tensor (a copy). Scalars (Adam's step) are replicated."""
    if kind == "replicated" or full.dim() == 0 or tp == 1 and kind != "vocab":
        return full.detach().clone()
    if kind == "qkv":
        grouped = full.detach().reshape(3, full.shape[0] // 3, *full.shape[1:])
        part = grouped.shape[1] // tp
        return grouped[:, rank * part : (rank + 1) * part].reshape(-1, *full.shape[1:]).clone()
    if kind == "vocab":
        rows = padded_vocab(full.shape[0], tp)
        padded = torch.zeros((rows, *full.shape[1:]), dtype=full.dtype, device=full.device)
        padded[: full.shape[0]] = full.detach()
        return padded.chunk(tp, dim=0)[rank].clone()
    dim = 1 if kind == "row" else 0
    return full.detach().chunk(tp, dim=dim)[rank].clone()


def unshard(slices: list[torch.Tensor], kind: str, vocab_size: int) -> torch.Tensor:
    """The full tensor from every TP rank's slice, in rank order (the inverse of `shard`)."""
    if kind == "replicated" or slices[0].dim() == 0:
        return slices[0]
    if kind == "qkv":
        parts = [s.reshape(3, s.shape[0] // 3, *s.shape[1:]) for s in slices]
        joined = torch.cat(parts, dim=1)
        return joined.reshape(-1, *joined.shape[2:])
    if kind == "vocab":
        return torch.cat(slices, dim=0)[:vocab_size]
    return torch.cat(slices, dim=1 if kind == "row" else 0)


def reshard(slices: list[torch.Tensor], kind: str, vocab_size: int, rank: int, tp: int) -> torch.Tensor:
    """From the slices of one TP size to this rank's slice at another."""
    return shard(unshard(slices, kind, vocab_size), kind, rank, tp)


def _parameter(tensor: torch.Tensor, partitioned: bool) -> nn.Parameter:
    param = nn.Parameter(tensor)
    param.tensor_parallel = partitioned  # type: ignore[attr-defined]  # gradient-norm bookkeeping
    return param


# ---- the layers ---------------------------------------------------------------------------


class ColumnParallelLinear(nn.Module):
    """Output features split: input replicated in, this rank's slice of the output out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, group: TensorCollectives):
        super().__init__()
        self.group = group
        self.weight = _parameter(weight, True)
        self.bias = _parameter(bias, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_region(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split: partial products are summed over the group, then the bias is added."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, group: TensorCollectives):
        super().__init__()
        self.group = group
        self.weight = _parameter(weight, True)
        self.bias = _parameter(bias, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_region(F.linear(x, self.weight), self.group) + self.bias


class VocabParallelEmbedding(nn.Module):
    """Each rank owns rows [start, start + rows) of the (padded) vocabulary; other ids give zeros
    here and their embedding arrives through the sum over the group."""

    def __init__(self, weight: torch.Tensor, start: int, group: TensorCollectives):
        super().__init__()
        self.group = group
        self.start = start
        self.weight = _parameter(weight, True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.start + self.weight.shape[0])
        local = (ids - self.start).masked_fill(outside, 0)
        embedded = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(embedded, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary, never gathering them: the max, the target's
    logit and the sum of exponentials are reduced over the group (Megatron's algorithm)."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        group: TensorCollectives,
        start: int,
        vocab_size: int,
    ) -> torch.Tensor:
        local = logits.float()
        width = local.shape[-1]
        padding = torch.arange(start, start + width, device=local.device) >= vocab_size
        local = local.masked_fill(padding, float("-inf"))  # padded ids are not words
        shifted = local - group.allreduce_(local.max(dim=-1).values.contiguous(), op="max").unsqueeze(-1)
        outside = (targets < start) | (targets >= start + width)
        local_targets = (targets - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target_logit = group.allreduce_(target_logit.contiguous())
        exp = shifted.exp()
        sum_exp = group.allreduce_(exp.sum(dim=-1).contiguous())
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local_targets, outside)
        ctx.logits_dtype = logits.dtype
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local_targets, outside = ctx.saved_tensors
        grad_logits = softmax.clone()
        grad_logits.scatter_add_(-1, local_targets.unsqueeze(-1), -(~outside).to(softmax.dtype).unsqueeze(-1))
        return (grad_logits * grad.unsqueeze(-1)).to(ctx.logits_dtype), None, None, None, None


class VocabParallelHead(nn.Module):
    """Logits for this rank's vocabulary slice through the tied (partitioned) embedding, and the
    vocabulary-parallel loss over them."""

    def __init__(self, group: TensorCollectives, start: int, vocab_size: int):
        super().__init__()
        self.group = group
        self.start = start
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_region(hidden, self.group), embedding_weight)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        per_token = _VocabParallelCrossEntropy.apply(
            flat, targets.reshape(-1), self.group, self.start, self.vocab_size
        )
        return per_token.mean()


# ---- partitioning the model ---------------------------------------------------------------


def check_tp(n_head: int, n_embd: int, tp: int) -> None:
    if n_head % tp:
        raise UsageError(f"model.n_head {n_head} is not divisible by tp {tp}: attention is split by heads")
    if (4 * n_embd) % tp:
        raise UsageError(f"the MLP width 4 × n_embd = {4 * n_embd} is not divisible by tp {tp}")


def partition_gpt(model: GPT, group: TensorCollectives) -> GPT:
    """Replace the full model's layers by this TP rank's partitions, in place."""
    tp, rank = group.size, group.rank
    if tp == 1:
        return model
    shape = model.shape
    check_tp(shape.n_head, shape.n_embd, tp)
    vocab_rows = padded_vocab(shape.vocab_size, tp)
    if vocab_rows != shape.vocab_size:
        log.info(
            "vocabulary padded from %d to %d so that it divides by tp = %d", shape.vocab_size, vocab_rows, tp
        )
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        attn.qkv = ColumnParallelLinear(
            shard(attn.qkv.weight, "qkv", rank, tp), shard(attn.qkv.bias, "qkv", rank, tp), group
        )
        attn.proj = RowParallelLinear(
            shard(attn.proj.weight, "row", rank, tp), attn.proj.bias.detach().clone(), group
        )
        attn.n_head = shape.n_head // tp
        mlp.fc = ColumnParallelLinear(
            shard(mlp.fc.weight, "col", rank, tp), shard(mlp.fc.bias, "col", rank, tp), group
        )
        mlp.proj = RowParallelLinear(
            shard(mlp.proj.weight, "row", rank, tp), mlp.proj.bias.detach().clone(), group
        )
    start = rank * vocab_rows // tp
    model.wte = VocabParallelEmbedding(shard(model.wte.weight, "vocab", rank, tp), start, group)
    model.lm_head = VocabParallelHead(group, start, shape.vocab_size)
    return model


def clip_grad_norm_(
    model: nn.Module, max_norm: float, group: TensorCollectives, pipeline_comm: Any = None
) -> float:
    """Clip by the norm of the *full* model's gradient: partitioned slices are summed over the TP
    group, replicated parameters counted once (they are identical on every TP rank), and with a
    pipeline the stages' sums are added (the last stage's copy of the tied embedding left out)."""
    partitioned = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    params = [p for p in model.parameters() if p.grad is not None]
    for p in params:
        if getattr(p, "pipeline_duplicate", False):
            continue
        square = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "tensor_parallel", False):
            partitioned += square
        else:
            replicated += square
    partitioned = group.allreduce_(partitioned.reshape(1)).reshape(())
    total_square = float(partitioned + replicated)
    if pipeline_comm is not None:
        with watchdog.waiting("gradient-norm allreduce over stages"):
            total_square = pipeline_comm.allreduce(total_square)
    total = total_square**0.5
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for p in params:
            p.grad.detach().mul_(scale)
    return total
