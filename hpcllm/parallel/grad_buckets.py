"""Gradient buckets: one flat gradient buffer per rank, reduced over the data-parallel group bucket by
bucket while backward is still running.

Every parameter's `.grad` is a view into one flat fp32 buffer, laid out in the reverse of the
model's parameter order (the order backward produces gradients) and cut into buckets of about
`bucket_mb`. A hook after each parameter's gradient accumulation counts down its bucket; when the
last gradient of a bucket has arrived on the backward pass that ends a reduction group, the bucket's
reduction starts at once on Horovod's background thread (asynchronous, on the DP process set), so
communication overlaps the backward of the layers before it. Nothing is copied to assemble a
reduction: a bucket is a contiguous slice of the buffer.

Two kinds of reduction:
- `allreduce` (zero = 0 and 1): every rank gets the averaged bucket, in place;
- `reducescatter` (zero = 2): rank r gets the average of its 1/dp of each bucket only, added into
  `shard` (the rank's reduced gradients); the local bucket is zeroed once it has been sent.
Buckets are padded to a multiple of dp so that each rank's share of a bucket is equal.

Parameters whose gradient must first be summed over another group (sequence-parallel LayerNorms
over TP, the tied embedding over the first and last pipeline stage) form the last, "late" bucket:
it is reduced in `finish`, after those sums (a sum over TP or stages commutes with the DP average).

Horovod rather than mpi4py: Horovod's background thread progresses the collective while backward
computes; a non-blocking MPI collective on CPU progresses only inside MPI calls (docs/memory.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hpcllm.cluster import watchdog


@dataclass
class Bucket:
    index: int
    start: int  # offset in the flat buffer
    length: int  # padded to a multiple of dp
    params: list[torch.nn.Parameter]
    late: bool = False  # reduced in finish(), after the cross-group sums
    waiting_for: int = 0  # gradients still to arrive in this backward pass
    passes: int = 0  # complete backward passes accumulated since the last reduction
    dirty: bool = False  # holds gradients not reduced yet
    handle: Any = None  # Horovod's handle of the reduction in flight
    sent: torch.Tensor | None = None  # what is being sent (fp16 copy when compressing)

    def share(self, rank: int, dp: int) -> tuple[int, int]:
        """The buffer range whose reduced gradient rank `rank` owns (zero = 1, 2)."""
        size = self.length // dp
        return self.start + rank * size, self.start + (rank + 1) * size


@dataclass
class GradientBuckets:
    params: Sequence[torch.nn.Parameter]  # the model's, in its order
    late: Sequence[torch.nn.Parameter]  # summed over another group before the DP reduction
    bucket_bytes: int
    dp: int
    dp_rank: int
    hvd: Any  # horovod.torch, or None with dp = 1
    process_set: Any
    reduce: str = "allreduce"  # or "reducescatter"
    every: int = 1  # backward passes (micro-batches) per reduction
    fp16: bool = False  # send fp16 copies (allreduce only)
    buckets: list[Bucket] = field(init=False)
    buffer: torch.Tensor = field(init=False)
    offsets: dict[int, tuple[int, int]] = field(init=False)  # id(param) -> its range in the buffer
    shard: torch.Tensor | None = field(init=False, default=None)  # reducescatter: this rank's share

    def __post_init__(self) -> None:
        late_ids = {id(p) for p in self.late}
        early = [p for p in reversed(self.params) if id(p) not in late_ids]
        late = [p for p in self.params if id(p) in late_ids]
        groups = _cut(early, self.bucket_bytes) + ([late] if late else [])
        self.buckets, start = [], 0
        for index, params in enumerate(groups):
            numel = sum(p.numel() for p in params)
            length = -(-numel // self.dp) * self.dp
            is_late = bool(late) and index == len(groups) - 1
            self.buckets.append(Bucket(index, start, length, params, late=is_late))
            start += length
        device = self.params[0].device
        self.buffer = torch.zeros(start, dtype=torch.float32, device=device)
        self.offsets = {}
        for bucket in self.buckets:
            offset = bucket.start
            for param in bucket.params:
                end = offset + param.numel()
                param.grad = self.buffer[offset:end].view_as(param)
                self.offsets[id(param)] = (offset, end)
                offset = end
                if not bucket.late:
                    param.register_post_accumulate_grad_hook(self._hook_for(bucket))
        if self.reduce == "reducescatter":
            self.shard = torch.zeros(start // self.dp, dtype=torch.float32, device=device)
        self.zero_()

    # ---- layout, for the distributed optimizer -----------------------------------------------

    def shares(self) -> list[tuple[int, int]]:
        """This rank's range of each bucket, in bucket order (concatenated, they are `shard`)."""
        return [bucket.share(self.dp_rank, self.dp) for bucket in self.buckets]

    def shard_pieces(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """reducescatter: (parameter, the slice of `shard` holding its reduced gradient) for each
        parameter this rank owns a part of (views: valid at every step)."""
        assert self.shard is not None
        pieces, base = [], 0
        for bucket in self.buckets:
            lo, hi = bucket.share(self.dp_rank, self.dp)
            for param in bucket.params:
                start, end = self.offsets[id(param)]
                first, last = max(start, lo), min(end, hi)
                if first < last:
                    pieces.append((param, self.shard[base + first - lo : base + last - lo]))
            base += hi - lo
        return pieces

    # ---- a step ------------------------------------------------------------------------------

    def zero_(self) -> None:
        """Before a step's first backward: clear the gradients (the views stay allocated)."""
        self.buffer.zero_()
        if self.shard is not None:
            self.shard.zero_()
        for bucket in self.buckets:
            bucket.passes, bucket.dirty = 0, False
            bucket.waiting_for = len(bucket.params)

    def _hook_for(self, bucket: Bucket) -> Callable[[torch.Tensor], None]:
        def gradient_arrived(param: torch.Tensor) -> None:
            bucket.dirty = True
            bucket.waiting_for -= 1
            if bucket.waiting_for:
                return
            bucket.waiting_for = len(bucket.params)
            bucket.passes += 1
            if bucket.passes == self.every:
                self._launch(bucket)

        return gradient_arrived

    def _launch(self, bucket: Bucket) -> None:
        bucket.passes, bucket.dirty = 0, False
        if self.hvd is None:
            return
        view = self.buffer[bucket.start : bucket.start + bucket.length]
        name = f"hpcllm.grads.{bucket.index}"
        if self.reduce == "reducescatter":
            bucket.handle = self.hvd.reducescatter_async(
                view, name=name, op=self.hvd.Average, process_set=self.process_set
            )
            return
        bucket.sent = view.half() if self.fp16 else view
        bucket.handle = self.hvd.allreduce_async_(
            bucket.sent, name=name, op=self.hvd.Average, process_set=self.process_set
        )

    def wait(self) -> None:
        """Complete every reduction in flight; call between micro-batches when `every` ends a group
        before the step does (the next backward writes into the buckets)."""
        with watchdog.waiting("gradient reduction (Horovod)"):
            for bucket in self.buckets:
                if bucket.handle is None:
                    continue
                result = self.hvd.synchronize(bucket.handle)
                bucket.handle = None
                view = self.buffer[bucket.start : bucket.start + bucket.length]
                if self.reduce == "reducescatter":
                    assert self.shard is not None
                    lo = bucket.start // self.dp
                    self.shard[lo : lo + result.numel()] += result
                    view.zero_()  # sent: the next passes accumulate from zero
                elif bucket.sent is not view:
                    view.copy_(bucket.sent)
                bucket.sent = None

    def finish(self, sum_late: Callable[[], None]) -> None:
        """After the step's last backward: sum the late gradients over their groups (`sum_late`),
        reduce what is left, and wait for every reduction."""
        self._check_views()
        sum_late()
        for bucket in self.buckets:
            if bucket.late or bucket.dirty:  # dirty: a remainder, or a gradient that never came
                self._launch(bucket)
        self.wait()

    def _check_views(self) -> None:
        """Autograd accumulates into an existing `.grad` in place; if something replaced one, the
        reduction would miss it: fail loudly instead."""
        for param in self.params:
            start, _ = self.offsets[id(param)]
            if param.grad is None or param.grad.data_ptr() != self.buffer[start:].data_ptr():
                raise RuntimeError(
                    "a parameter's .grad is no longer a view of the gradient buffer "
                    "(something set or replaced it outside autograd)"
                )


def _cut(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive groups of about `bucket_bytes` (a parameter larger than that is a bucket alone)."""
    groups: list[list[torch.nn.Parameter]] = []
    size = bucket_bytes
    for param in params:
        nbytes = param.numel() * 4
        if size + nbytes > bucket_bytes and (not groups or groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(param)
        size += nbytes
    return [group for group in groups if group]
