"""Counting memory by kind: the bytes autograd keeps for backward (activations), and the bytes of
parameters, gradients and optimizer state a rank holds."""

from __future__ import annotations

from typing import Any

import torch


def saved_activation_bytes(model: Any, idx: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward during `model.loss(model(idx), targets)`
    (parameters, which autograd saves by reference, are not counted; storage shared by several
    saved tensors counts once). A backward pass then frees the graph and leaves the gradients."""
    parameter_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in parameter_storage and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model.loss(model(idx), targets)
    loss.backward()
    return total


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def predicted_activation_bytes(
    shape: Any, micro_batch: int, recompute: str, tp: int = 1, sequence_parallel: bool = False
) -> int | None:
    """Activation bytes of one micro-batch per rank, by Korthikanti et al. 2022's method applied to
    this implementation (None with dropout, whose masks and the unfused attention it forces on CPU
    are not modelled), in fp32.

    The paper counts, per layer, s*b*h*(34 + 5*a*s/h) bytes for 16-bit activations with an
    attention core that stores the a*s*s scores, softmax and dropout mask; the layers' share is the
    model family's (`ModelFamily.activation_bytes_per_layer`, which gives the fp32 terms of
    PyTorch's fused attention). Outside the layers:
    the logits and their log-softmax (4*sbv/t, the head is vocabulary-parallel), the final
    LayerNorm's input and output (8*sbh, /t with sequence parallelism) and the token ids (24*sb).
    """
    if shape.dropout:
        return None
    s, b, h, v = shape.block_size, micro_batch, shape.n_embd, shape.vocab_size
    per_layer = shape.family.activation_bytes_per_layer(shape, b, tp, recompute, sequence_parallel, 4)
    split = tp if sequence_parallel else 1  # the regions outside the TP layers
    outside = 4 * s * b * v / tp + 8 * s * b * h / split + 24 * s * b
    return int(shape.n_layer * per_layer + outside)
