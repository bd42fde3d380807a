"""`hpcllm bench context`: activation bytes per rank and attention time at a long sequence, for each
context-parallel size side by side (parallel.cp).

For each cp, `cp` ranks under mpirun build the same model at `model.block_size` (the configured
shape, dropout off), enable context parallelism (each rank holds chunks i and 2·cp−1−i of the
sequence) and, for one micro-batch of random tokens, count the bytes autograd keeps for backward
on each rank (saved-tensor hooks; observe.memory's rule) and time the attention alone, forward and
backward, through the ring: its median against a whole-sequence attention on one rank divided by
cp (the same work per rank, no communication). From the per-rank bytes and the model's states,
the longest sequence that fits a per-rank budget is extrapolated (activations grow linearly with
the sequence at a fixed width with fused attention).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hpcllm.cluster.launcher import launch_command, run_launched


def child(sets: list[str], out: str, repeat: int) -> None:
    """One cp size, on every rank of the launch (the world is the CP group)."""
    import torch
    import torch.nn.functional as F
    from mpi4py import MPI

    from hpcllm.model.registry import family_of
    from hpcllm.parallel.context.ring_attention import held_positions, ring_attention
    from hpcllm.training import config as config_mod

    comm = MPI.COMM_WORLD
    cp, rank = comm.Get_size(), comm.Get_rank()
    config = config_mod.load(None, [*sets, "model.dropout=0"])
    family, m = family_of(config.model), config.model
    shape = family.shape(m, 4096)
    model = family.build(shape, 0, None, True, True)
    sequence, micro = m.block_size, config.train.micro_batch
    ids = torch.randint(0, 4096, (micro, sequence), generator=torch.Generator().manual_seed(0))
    held = held_positions(sequence, cp, rank) if cp > 1 else torch.arange(sequence)
    if cp > 1:
        model.enable_context_parallel(comm, held)
    kept = _saved_bytes(model, ids[:, held], held.expand(micro, -1))
    heads, dim = m.n_head, m.n_embd // m.n_head
    q, k, v = (torch.randn(micro, heads, len(held), dim, requires_grad=True) for _ in range(3))
    times = []
    for _ in range(repeat + 1):
        comm.Barrier()
        started = time.perf_counter()
        if cp > 1:
            ring_attention(q, k, v, held, comm).sum().backward()
        else:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        times.append(time.perf_counter() - started)
    row = {"cp": cp, "kept_bytes": max(comm.allgather(kept)), "attention_s": statistics.median(times[1:])}
    row["state_bytes"] = 16 * sum(p.numel() for p in model.parameters())
    if rank == 0:
        Path(out).write_text(json.dumps(row))


def _saved_bytes(model: Any, ids: Any, positions: Any) -> int:
    import torch

    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = tensor.untyped_storage().data_ptr()
        if key not in seen and not isinstance(tensor, torch.nn.Parameter):
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model.sequence_loss_sum(ids, torch.roll(ids, -1, dims=1), True, positions)
    loss.backward()
    return total


def run(sets: list[str], sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcllm-context-") as tmp:
        for cp in sizes:
            out = Path(tmp) / f"cp{cp}.json"
            code = f"from hpcllm.bench.context import child; child({sets!r}, {str(out)!r}, {repeat})"
            command = [sys.executable, "-c", code]
            run_launched(launch_command(cp) + command if cp > 1 else command, f"bench context: cp={cp}")
            rows.append(json.loads(out.read_text()))
    whole = next(r for r in rows if r["cp"] == 1)
    for r in rows:
        r["kept_x"] = r["kept_bytes"] / whole["kept_bytes"]
        r["attention_x"] = r["attention_s"] / (whole["attention_s"] / r["cp"])
    return rows


def longest_sequence(rows: list[dict[str, Any]], sequence: int, budget_bytes: float) -> dict[int, int]:
    """Per cp, the longest sequence whose activations (linear in the sequence) and states fit."""
    return {r["cp"]: int((budget_bytes - r["state_bytes"]) / (r["kept_bytes"] / sequence)) for r in rows}


def render(rows: list[dict[str, Any]], sequence: int, budget_gb: float) -> str:
    fits = longest_sequence(rows, sequence, budget_gb * 1e9)
    lines = [
        f"one micro-batch at sequence {sequence:,}: bytes kept for backward per rank, and attention time",
        f"{'cp':>3} {'kept MB':>9} {'kept x':>7} {'attention ms':>13} {'vs 1/cp of one rank':>20} "
        f"{f'longest in {budget_gb:g} GB':>18}",
    ]
    for r in rows:
        lines.append(
            f"{r['cp']:>3} {r['kept_bytes'] / 1e6:>9.1f} {r['kept_x']:>7.2f} {r['attention_s'] * 1e3:>13.1f} "
            f"{r['attention_x']:>20.2f} {fits[r['cp']]:>18,}"
        )
    return "\n".join(lines)
