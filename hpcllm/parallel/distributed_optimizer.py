"""The distributed optimizer (ZeRO stage 1): AdamW whose state is sharded over the data-parallel group.

The rank's parameters live in one flat fp32 buffer and their gradients in another (each `.data`
and `.grad` is a view into them, so a reduction is one contiguous tensor and nothing is copied
to assemble it). The flat buffers are cut into `dp` equal shards; rank `r` of the DP group keeps
the Adam moments of shard `r` only and updates only those parameters, then the updated shards are
all-gathered back into every replica's parameter buffer. Per rank that is 4 bytes of parameters
+ 4 of gradients + 8/dp of Adam state per parameter, instead of 16.

Communication goes through Horovod on the DP process set (allreduce of the gradient buffer,
allgather of the updated shards), the same library and groups as the dp = 1 optimizer's path.
The update is torch's AdamW, element by element, so a step gives the same parameters as
`torch.optim.AdamW` up to the order of the reduction.

Checkpoints stay layout-free: `full_state()` gathers the moments and presents them per parameter,
as AdamW's state, for the duration of a save; a state loaded that way is cut into this rank's
shard at the next step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hpcllm.cluster import watchdog


class ShardedAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        groups: list[dict[str, Any]],
        hvd: Any,
        process_set: Any,
        dp_size: int,
        dp_rank: int,
        lr: float,
        betas: tuple[float, float],
        eps: float,
    ):
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.hvd, self.process_set = hvd, process_set
        params = [p for group in self.param_groups for p in group["params"]]
        total = sum(p.numel() for p in params)
        self.shard_size = -(-total // dp_size)  # padded so that every shard is equally long
        padded = self.shard_size * dp_size
        device = params[0].device
        self.param_buffer = torch.zeros(padded, dtype=torch.float32, device=device)
        self.grad_buffer = torch.zeros(padded, dtype=torch.float32, device=device)
        decay = torch.zeros(padded, dtype=torch.float64, device=device)
        self.views: list[tuple[torch.nn.Parameter, int, int]] = []
        offset = 0
        for group in self.param_groups:
            for param in group["params"]:
                end = offset + param.numel()
                self.param_buffer[offset:end].copy_(param.detach().reshape(-1))
                param.data = self.param_buffer[offset:end].view_as(param)
                param.grad = self.grad_buffer[offset:end].view_as(param)
                decay[offset:end] = group["weight_decay"]
                self.views.append((param, offset, end))
                offset = end
        self.lo, self.hi = dp_rank * self.shard_size, (dp_rank + 1) * self.shard_size
        self.decay = decay[self.lo : self.hi]
        self.exp_avg = torch.zeros(self.shard_size, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.steps = 0

    @property
    def state_bytes(self) -> int:
        """The Adam moments this rank holds."""
        return (self.exp_avg.numel() + self.exp_avg_sq.numel()) * self.exp_avg.element_size()

    # ---- what the trainer calls, as on Horovod's DistributedOptimizer ----------------------

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.grad_buffer.zero_()  # the gradients are views into it: they must stay allocated

    def synchronize(self) -> None:
        """Average the gradient buffer over the DP group (one allreduce of one tensor)."""
        with watchdog.waiting("gradient allreduce (distributed optimizer)"):
            self.hvd.allreduce_(
                self.grad_buffer, op=self.hvd.Average, name="hpcllm.zero.grads", process_set=self.process_set
            )

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        yield  # the trainer synchronizes before clipping; step() never reduces

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self._adopt_loaded_state()
        self.steps += 1
        group = self.param_groups[0]  # lr, betas and eps are the same in every group
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        param = self.param_buffer[self.lo : self.hi]
        grad = self.grad_buffer[self.lo : self.hi]
        # torch.optim.AdamW's update (single-tensor form), with the weight decay per element.
        param.mul_((1 - lr * self.decay).to(param.dtype))
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**self.steps)
        denom = (self.exp_avg_sq.sqrt() / (1 - beta2**self.steps) ** 0.5).add_(eps)
        param.addcdiv_(self.exp_avg, denom, value=-step_size)
        self._gather_into(self.param_buffer, param, "params")

    def _gather_into(self, full: torch.Tensor, shard: torch.Tensor, what: str) -> None:
        with watchdog.waiting(f"allgather of the updated {what} (distributed optimizer)"):
            gathered = self.hvd.allgather(
                shard.clone(), name=f"hpcllm.zero.{what}", process_set=self.process_set
            )
        full.copy_(gathered)

    # ---- checkpoints: AdamW's per-parameter state, gathered for a save ---------------------

    @contextmanager
    def full_state(self) -> Iterator[None]:
        """Collective over the DP group: `self.state` holds every parameter's full Adam state (as
        torch's AdamW names it) inside the block, and nothing after it."""
        self._adopt_loaded_state()
        moments = {}
        for key, shard in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            moments[key] = torch.empty_like(self.param_buffer)
            self._gather_into(moments[key], shard, key)
        if self.steps:
            for param, start, end in self.views:
                self.state[param] = {
                    "step": torch.tensor(float(self.steps)),
                    **{key: full[start:end].view_as(param) for key, full in moments.items()},
                }
        try:
            yield
        finally:
            self.state.clear()

    def _adopt_loaded_state(self) -> None:
        """A checkpoint load fills `self.state` with full per-parameter tensors: keep this rank's
        shard of them and drop the rest."""
        if not self.state:
            return
        for key, shard in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            full = torch.zeros_like(self.param_buffer)
            for param, start, end in self.views:
                full[start:end] = self.state[param][key].reshape(-1)
            shard.copy_(full[self.lo : self.hi])
        self.steps = int(next(iter(self.state.values()))["step"])
        self.state.clear()
