"""What users would write instead of hpcllm, on the same model, data and batch: a plain PyTorch loop
(one process) and torch DistributedDataParallel over gloo (under mpirun). Run as a module by
`hpcllm bench train`; prints one JSON line with the measured tokens/s and the per-step phase
times (same timer as hpcllm's) per logging interval.

    python -m hpcllm.bench.baselines plain|ddp --data DIR --steps N [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from hpcllm.data.loader import BatchSampler, micro_batches
from hpcllm.data.sequences import TokenWindows
from hpcllm.data.tokens import open_prepared
from hpcllm.model.heads import lm_loss
from hpcllm.model.registry import family_of
from hpcllm.observe.timing import PhaseTimer
from hpcllm.training import config as config_mod
from hpcllm.training.optim import make_optimizer

LOG_EVERY = 10


def _start_ddp() -> tuple[int, int]:
    """torch.distributed (gloo) on the ranks mpirun started; (rank, world)."""
    import torch.distributed as dist

    rank, world = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=os.environ["HPCLLM_BENCH_INIT"], rank=rank, world_size=world)
    return rank, world


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=["plain", "ddp"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    config = config_mod.load(assignments=args.set)
    prepared = open_prepared(args.data, verify=False)
    tokens = prepared.tokens("train")

    rank, world = _start_ddp() if args.variant == "ddp" else (0, 1)

    m, t = config.model, config.train
    family = family_of(m)
    model = family.build(family.shape(m, prepared.vocab_size), t.seed, None, True, True)
    optimizer = make_optimizer(model, config.train)
    trained: torch.nn.Module = model
    if args.variant == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    windows = TokenWindows(tokens, m.block_size)
    sampler = BatchSampler(windows.n_sequences, t.seed)
    per_rank = t.global_batch // world
    n_micro = per_rank // t.micro_batch

    rates, phases = [], []
    timer = PhaseTimer()
    last = time.perf_counter()
    for step in range(args.steps):
        optimizer.zero_grad()
        with timer.phase("data"):
            indices = sampler.rank_indices(step * t.global_batch, t.global_batch, rank, world)
            batches = [
                (torch.from_numpy(batch.tokens), torch.from_numpy(batch.targets))
                for batch in micro_batches(windows, indices, t.micro_batch)
            ]
        for i, (x, y) in enumerate(batches):
            sync = args.variant != "ddp" or i == n_micro - 1
            with torch.enable_grad() if sync else trained.no_sync():  # type: ignore[operator]
                with timer.phase("forward"):
                    loss = lm_loss(trained(x), y)
                    loss.item()
                with timer.phase("backward"):  # DDP's allreduce runs inside the last backward
                    (loss / n_micro).backward()
        with timer.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
        timer.step_done()
        if (step + 1) % LOG_EVERY == 0:
            now = time.perf_counter()
            rates.append(LOG_EVERY * t.global_batch * m.block_size / (now - last))
            phases.append(timer.take_ms_per_step())
            last = now
    if rank == 0:
        result = {"variant": args.variant, "ranks": world, "tokens_per_s": rates, "phase_ms": phases}
        print(json.dumps(result))


if __name__ == "__main__":
    main()
