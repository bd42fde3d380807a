"""Counting memory by kind: the bytes autograd keeps for backward (activations), and the bytes of
parameters, gradients and optimizer state a rank holds."""

from __future__ import annotations

from typing import Any

import torch


def saved_activation_bytes(model: Any, idx: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward during the loss of `idx` (the model's
    `sequence_loss_sum`: its head whole, or chunk by chunk with `loss_chunk`)
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
        loss = model.sequence_loss_sum(idx, targets)
    loss.backward()
    return total


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
