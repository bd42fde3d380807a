"""An optimizer's state as tensors keyed by parameter name, and back: what a checkpoint shard
holds of it, so that it survives a change of layout (the names, not the order, identify it)."""

from __future__ import annotations

from typing import Any

import torch


def to_tensors(
    optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimizer state keyed by parameter name (so it survives a change of layout), and its groups."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append(
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": [names[p] for p in group["params"]],
            }
        )
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                tensors[f"optim.{names[param]}.{key}"] = torch.as_tensor(value).detach()  # the caller copies
    return tensors, groups


def from_tensors(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    groups: list[dict[str, Any]],
    params_by_name: dict[str, torch.nn.Parameter],
) -> None:
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        kept = {"fused", "capturable", "foreach"}  # how this run's optimizer executes, not the saved one's
        group.update(
            {
                k: (tuple(v) if isinstance(v, list) else v)
                for k, v in saved.items()
                if k != "params" and k not in kept
            }
        )
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name, param in params_by_name.items():
        prefix = f"optim.{name}."
        group = group_of.get(id(param), {})
        # Where PyTorch keeps it: the step counter stays on the CPU unless the fused or capturable
        # kernels want it next to the parameter; everything else goes to the parameter's device.
        step_on_device = bool(group.get("fused") or group.get("capturable"))
        state = {
            key[len(prefix) :]: value.to(param.device) if key != f"{prefix}step" or step_on_device else value
            for key, value in tensors.items()
            if key.startswith(prefix)
        }
        if state:
            optimizer.state[param] = state
