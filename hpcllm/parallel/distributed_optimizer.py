"""The distributed optimizer (ZeRO stages 1 and 2): AdamW whose state is sharded over the data-parallel
group.

The rank's gradients live in the flat buffer of `GradientBuckets` and its parameters in a second
flat buffer laid out alike (each `.data` is a view into it, as each `.grad` is into the other).
Every bucket is cut into `dp` equal shares; rank `r` of the DP group keeps the Adam moments of its
share of each bucket only and updates only those parameters, then the updated shares are
all-gathered back into every replica's parameter buffer. Per rank that is 4 bytes of parameters
+ 4 of gradients + 8/dp of Adam state per parameter, instead of 16.

- zero = 1: the buckets are allreduced (every rank holds the whole averaged gradient);
- zero = 2: they are reduce-scattered, so the reduced gradients exist only as this rank's shares
  (`GradientBuckets.shard`): half the gradient traffic of zero = 1, and the norm and clipping of
  the step read the shard. The local accumulation buffer stays whole, as in Megatron-Core's
  distributed optimizer.

Communication goes through Horovod on the DP process set. The update is torch's AdamW, element by
element, so a step gives the same parameters as `torch.optim.AdamW` up to the order of the reduction.

Checkpoints: every DP rank writes its own shares of the moments (`state_parts`), with no gather;
a load joins them into AdamW's per-parameter state (training.checkpoint), which this rank cuts
into its shares at the next step, so a checkpoint resumes at any other dp, tp, pp or zero level.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from hpcllm.cluster import watchdog
from hpcllm.parallel.fully_sharded import FullyShardedUnits
from hpcllm.parallel.grad_buckets import GradientBuckets

GATHERS_IN_FLIGHT = 2  # bucket allgathers outstanding at once: overlap, at two buckets of memory


class ShardedAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        groups: list[dict[str, Any]],
        gradients: GradientBuckets,
        lr: float,
        betas: tuple[float, float],
        eps: float,
    ):
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.gradients = gradients
        self.hvd, self.process_set = gradients.hvd, gradients.process_set
        params = [(param, group["weight_decay"]) for group in self.param_groups for param in group["params"]]
        self._hold_parameters([param for param, _ in params])
        # This rank's range of each bucket, and where it sits in the concatenated shard (the
        # moments and, with zero = 2, the reduced gradients are laid out that way).
        self.shares = gradients.shares()
        sizes = [hi - lo for lo, hi in self.shares]
        self.share_starts = [sum(sizes[:i]) for i in range(len(sizes))]
        # What this rank owns of each parameter: (parameter, its decay, where it starts in the
        # buffers, the owned range [a, b) of them, where that range starts in the shard). A
        # parameter lies in one bucket, so in at most one of this rank's shares.
        self.owned = [
            (param, decay, start, a, b, first + a - lo)
            for param, decay in params
            for start, end in [gradients.offsets[id(param)]]
            for (lo, hi), first in zip(self.shares, self.share_starts, strict=True)
            if (a := max(start, lo)) < (b := min(end, hi))
        ]
        self.exp_avg = torch.zeros(
            sum(sizes), dtype=torch.float32, device=self.param_groups[0]["params"][0].device
        )
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.steps = 0

    def _hold_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """The parameters become views into one flat buffer laid out like the gradients'."""
        grads = self.gradients.buffer
        self.param_buffer = torch.zeros_like(grads)
        for param in params:
            start, end = self.gradients.offsets[id(param)]
            self.param_buffer[start:end].copy_(param.detach().reshape(-1))
            param.data = self.param_buffer[start:end].view_as(param)

    def _parameters_at(self, lo: int, hi: int, at: int) -> torch.Tensor:
        """The parameters of the range [lo, hi) of the buffers' layout (at `at` in the shard)."""
        return self.param_buffer[lo:hi]

    @property
    def parts(self) -> tuple[int, int]:
        """(which, of how many): the part of the state this rank's checkpoint file holds (its place
        in the group the state is sharded over)."""
        return self.gradients.dp_rank, self.gradients.dp

    @property
    def state_bytes(self) -> int:
        """The Adam moments this rank holds."""
        return (self.exp_avg.numel() + self.exp_avg_sq.numel()) * self.exp_avg.element_size()

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.gradients.zero_()  # the gradients are views into its buffer: they must stay allocated

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self._adopt_loaded_state()
        self.steps += 1
        group = self.param_groups[0]  # lr, betas and eps are the same in every group
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        # torch.optim.AdamW's decoupled weight decay, by ranges (no value per element)
        for _, decay, _, a, b, at in self.owned:
            if decay:
                self._parameters_at(a, b, at).mul_(1 - lr * decay)
        step_size = lr / (1 - beta1**self.steps)
        bias_correction2 = (1 - beta2**self.steps) ** 0.5
        shard = self.gradients.shard
        # Share by share, on views of the buffers: no copy of the parameters or gradients, and
        # temporaries of one share at a time.
        for (lo, hi), first in zip(self.shares, self.share_starts, strict=True):
            last = first + hi - lo
            grad = shard[first:last] if shard is not None else self.gradients.buffer[lo:hi]
            exp_avg, exp_avg_sq = self.exp_avg[first:last], self.exp_avg_sq[first:last]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2).add_(eps)
            self._parameters_at(lo, hi, first).addcdiv_(exp_avg, denom, value=-step_size)
        self._gather_parameters()

    def _gather_parameters(self) -> None:
        """Collective: every rank's updated share of each bucket, into every replica's parameter
        buffer. At most GATHERS_IN_FLIGHT buckets at a time: each gather returns a bucket-sized
        tensor, and all of them at once would cost as much as the parameters again."""
        pending: deque[tuple[int, Any]] = deque()
        with watchdog.waiting("allgather of the updated parameters (distributed optimizer)"):
            for index, (lo, hi) in enumerate(self.shares):
                # A view, sent as it is: nothing writes to it before its allgather is synchronised.
                share = self.param_buffer[lo:hi]
                name = f"hpcllm.zero.params.{index}"
                pending.append(
                    (index, self.hvd.allgather_async(share, name=name, process_set=self.process_set))
                )
                if len(pending) >= GATHERS_IN_FLIGHT:
                    self._land(*pending.popleft())
            while pending:
                self._land(*pending.popleft())

    def _land(self, index: int, handle: Any) -> None:
        bucket = self.gradients.buckets[index]
        self.param_buffer[bucket.start : bucket.start + bucket.length].copy_(self.hvd.synchronize(handle))

    # ---- checkpoints: each rank's own shares, no gather -------------------------------------

    def state_parts(
        self, names: dict[torch.nn.Parameter, str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's shares of the Adam state, per parameter: `optim.NAME.exp_avg` and
        `.exp_avg_sq` (views: the checkpoint copies them), and which elements of the flattened
        parameter they are (`parts`: NAME -> [first, end]) with the step count. No communication:
        every DP rank writes its own, and a load joins them (training.checkpoint)."""
        self._adopt_loaded_state()
        tensors: dict[str, torch.Tensor] = {}
        parts: dict[str, list[int]] = {}
        for param, _, start, a, b, at in self.owned if self.steps else ():
            name = names[param]
            parts[name] = [a - start, b - start]
            for key, moment in self._moments():
                tensors[f"optim.{name}.{key}"] = moment[at : at + b - a]
        return tensors, {"step": self.steps, "parts": parts}

    def _moments(self) -> tuple[tuple[str, torch.Tensor], ...]:
        """The Adam moments as torch's AdamW names them."""
        return (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq))

    def _adopt_loaded_state(self) -> None:
        """A checkpoint load fills `self.state` with full per-parameter tensors: keep this rank's
        shard of them and drop the rest."""
        if not self.state:
            return
        for key, shard in self._moments():
            for param, _, start, a, b, at in self.owned:
                shard[at : at + b - a].copy_(self.state[param][key].reshape(-1)[a - start : b - start])
        self.steps = int(next(iter(self.state.values()))["step"])
        self.state.clear()


class FullyShardedAdamW(ShardedAdamW):
    """The distributed optimizer of parallel.zero = 3: the parameters' shares are the units'
    (`FullyShardedUnits.param_shard`), updated in place and gathered by the units when they next
    compute, so nothing is gathered after the step. Checkpoints carry the parameters' shares too."""

    gradients: FullyShardedUnits

    def _hold_parameters(self, params: list[torch.nn.Parameter]) -> None:
        pass  # the units hold them

    def _parameters_at(self, lo: int, hi: int, at: int) -> torch.Tensor:
        return self.gradients.param_shard[at : at + hi - lo]

    def _gather_parameters(self) -> None:
        pass

    def state_parts(
        self, names: dict[torch.nn.Parameter, str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The Adam state's shares, and this rank's shares of the parameters (`model.NAME`) with
        every parameter's shape (no rank holds a whole one to read it from)."""
        tensors, meta = super().state_parts(names)
        for param, _, start, a, b, at in self.owned:
            meta["parts"][names[param]] = [a - start, b - start]
            tensors[f"model.{names[param]}"] = self._parameters_at(a, b, at)
        meta["shapes"] = {names[param]: list(param.shape) for param in names}
        return tensors, meta
