"""`hpcllm bench memory`: bytes per rank by kind (parameters, gradients, optimizer state,
activations) and step time, for each activation-recomputation mode and distributed-optimizer
setting, on one process (on the GPU when there is one).

Activations are measured: the bytes autograd keeps for backward during one micro-batch's forward
(observe.memory). Parameters and gradients are those of the model built here; the optimizer's are
AdamW's two fp32 moments per parameter, divided over `dp` with parallel.zero=1 and 2 (what the
distributed optimizer allocates; its tests check the layout); zero=2 adds the rank's shard of the
reduced gradients (4/dp bytes per parameter) next to the local accumulation buffer; zero=3 holds
1/dp of the weights and gradients, plus the units whole at once (the embedding and head, two
blocks' weights and one block's gradients: parallel.fully_sharded.whole_bytes). Step time is
the median of forward + backward + AdamW over `steps` steps. `peak_bytes` is the sum of the kinds
on CPU, and on CUDA the allocator's peak (`torch.cuda.max_memory_allocated`) over those steps.
Each row carries the activation bytes predicted by `ModelFamily.predicted_activation_bytes`.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hpcllm.cluster.launcher import launch_command, run_launched
from hpcllm.model.gpt import GPT
from hpcllm.model.registry import family_of
from hpcllm.observe.memory import saved_activation_bytes, tensor_bytes
from hpcllm.parallel.fully_sharded import whole_bytes
from hpcllm.training.config import RECOMPUTE, ZERO, Config
from hpcllm.training.optim import make_optimizer

MB = 1e6


def _step(model: GPT, idx: torch.Tensor, steps: int, train: Any) -> tuple[float, int | None]:
    """Median step milliseconds, and on CUDA the allocator's peak bytes over the steps (None on
    CPU, which keeps no allocator statistics)."""
    optimizer = make_optimizer(model, train)
    cuda = idx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(idx.device)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
        model.loss(model(idx), idx).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(idx.device)
        times.append((time.perf_counter() - started) * 1e3)
    peak = torch.cuda.max_memory_allocated(idx.device) if cuda else None
    return statistics.median(times[1:]), peak


def _micro_batch(config: Config, vocab_size: int) -> torch.Tensor:
    """One micro-batch of random token ids (the same in every measurement)."""
    shape = (config.train.micro_batch, config.model.block_size)
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(0))


def run(config: Config, vocab_size: int, dp: int, steps: int) -> list[dict[str, Any]]:
    m, t = config.model, config.train
    family = family_of(m)
    shape = family.shape(m, vocab_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    idx = _micro_batch(config, vocab_size).to(device)
    rows = []
    for recompute in RECOMPUTE:
        model = family.build(shape, t.seed, None, True, True).to(device)
        model.set_recompute(recompute)
        model.loss_chunk = config.train.loss_chunk  # the head whole, or chunk by chunk
        activations = saved_activation_bytes(model, idx, idx)
        step_ms, allocator_peak = _step(model, idx, steps, t)
        params = tensor_bytes(list(model.parameters()))
        predicted = family.predicted_activation_bytes(shape, t.micro_batch, recompute)
        kept, block = whole_bytes(model.shard_units())
        for zero in ZERO if dp > 1 else (0,):
            optimizer = 2 * params // (dp if zero else 1)
            grads = params + (params // dp if zero == 2 else 0)
            weights = params
            if zero == 3:  # shares, plus the units whole at once (parallel.fully_sharded)
                weights, grads = params // dp + kept + 2 * block, params // dp + block
            total = weights + grads + optimizer + activations
            if allocator_peak is not None:  # measured at zero=0; sharding changes the states only
                total = allocator_peak - 4 * params + weights + grads + optimizer
            rows.append(
                {
                    "layout": f"dp={dp}",
                    "zero": zero,
                    "recompute": recompute,
                    "sequence_parallel": False,
                    "params_bytes": weights,
                    "grads_bytes": grads,
                    "optimizer_bytes": optimizer,
                    "activation_bytes": activations,
                    "peak_bytes": total,
                    "predicted_activation_bytes": predicted,
                    "step_ms": step_ms,
                }
            )
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    base = next(r for r in rows if r["recompute"] == "none" and r["zero"] == 0)
    lines = [
        f"{'recompute':<10} {'zero':>4} {'params MB':>10} {'grads MB':>9} {'optim MB':>9} "
        f"{'activ. MB':>10} {'formula MB':>10} {'sum MB':>8} {'step ms':>8} {'activ. x':>9} "
        f"{'optim x':>8} {'time x':>7}"
    ]
    for r in rows:
        mb = {key: r[f"{key}_bytes"] / MB for key in ("params", "grads", "optimizer", "activation", "peak")}
        predicted = r["predicted_activation_bytes"]
        formula = f"{predicted / MB:>10.2f}" if predicted is not None else f"{'-':>10}"
        lines.append(
            f"{r['recompute']:<10} {r['zero']:>4} {mb['params']:>10.2f} {mb['grads']:>9.2f} "
            f"{mb['optimizer']:>9.2f} {mb['activation']:>10.2f} {formula} {mb['peak']:>8.2f} "
            f"{r['step_ms']:>8.1f} {r['activation_bytes'] / base['activation_bytes']:>9.2f} "
            f"{r['optimizer_bytes'] / base['optimizer_bytes']:>8.2f} {r['step_ms'] / base['step_ms']:>7.2f}"
        )
    lines.append("activ. x, optim x, time x: against recompute=none, zero=0; activations of one micro-batch")
    lines.append(
        "formula MB: ModelFamily.predicted_activation_bytes (Korthikanti et al., fp32, fused attention)"
    )
    return "\n".join(lines)


# ---- the largest model for a budget, from measured per-layer bytes -----------------------------


def largest_models(config: Config, vocab_size: int, dp: int, budget_bytes: float) -> list[dict[str, Any]]:
    """For each mode, the most layers (at the configured width, sequence and micro-batch) whose
    parameters, gradients, optimizer state and one micro-batch's activations fit in `budget_bytes`
    per rank. Activations per layer and those outside the layers are measured, from models of one
    and two layers; parameters are counted exactly."""
    family = family_of(config.model)
    full = family.shape(config.model, vocab_size)
    idx = _micro_batch(config, vocab_size)
    rows = []
    for recompute in RECOMPUTE:
        kept = []
        for layers in (1, 2):
            model = family.build(replace(full, n_layer=layers), 0, None, True, True)
            model.set_recompute(recompute)
            model.loss_chunk = config.train.loss_chunk  # the head whole, or chunk by chunk
            kept.append(saved_activation_bytes(model, idx, idx))
        per_layer_activations, outside_activations = kept[1] - kept[0], 2 * kept[0] - kept[1]
        shape = replace(full, n_layer=0, dropout=0.0)
        for zero in (0, 1, 3) if dp > 1 else (0,):
            per_parameter = 4 + 4 + 8 / (dp if zero else 1)  # fp32 weights, gradients, Adam moments
            counts = family.parameters(shape)
            fixed = counts.total * per_parameter + outside_activations
            if zero == 3:  # all sharded; the embedding and head, two blocks and a gradient whole
                per_parameter = 16 / dp
                fixed = counts.total * (per_parameter + 4) + 12 * counts.per_layer + outside_activations
            per_layer = counts.per_layer * per_parameter + per_layer_activations
            layers = max(0, int((budget_bytes - fixed) // per_layer))
            parameters = counts.total + layers * counts.per_layer
            rows.append({"recompute": recompute, "zero": zero, "n_layer": layers, "parameters": parameters})
    return rows


def render_largest(rows: list[dict[str, Any]], budget_gb: float, config: Config, dp: int) -> str:
    m, t = config.model, config.train
    lines = [
        f"largest model in {budget_gb:g} GB per rank: width {m.n_embd}, sequence {m.block_size}, "
        f"micro-batch {t.micro_batch}, dp {dp} (zero=1 shards the Adam state over it, zero=3 everything)",
        f"{'recompute':<10} {'zero':>4} {'n_layer':>8} {'parameters':>12}",
    ]
    for r in rows:
        lines.append(f"{r['recompute']:<10} {r['zero']:>4} {r['n_layer']:>8} {r['parameters'] / 1e6:>11.1f}M")
    return "\n".join(lines)


# ---- peak memory as the processes saw it ---------------------------------------------------


def measure(sets: list[str], dp: int, steps: int, data: str | None) -> list[dict[str, Any]]:
    """For each zero level, with glibc's adaptive mmap threshold and with train.mmap_mb = 1 (freed
    tensors returned to the system, so the peak is what was live): `hpcllm train` at `dp` ranks for
    `steps` steps with a checkpoint at the end, and every rank's peak resident memory (`ru_maxrss`,
    RUN/memory.json): what the tensor accounting above leaves out (allocator caches, copies,
    communication buffers, checkpoints); with the median tokens/s of the steps after the first."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcllm-memory-") as tmp:
        for zero, mmap_mb in ((z, m) for m in (0, 1) for z in (ZERO if dp > 1 else (0,))):
            out = Path(tmp) / f"zero{zero}-mmap{mmap_mb}"
            keys = [*sets, f"parallel.zero={zero}", f"train.ckpt_every={steps}", "train.eval_every=0"]
            keys += [f"train.mmap_mb={mmap_mb}", "train.log_every=1"]
            command = [sys.executable, "-m", "hpcllm.cli", "train", "--out", str(out), "--steps", str(steps)]
            command += [
                "--quiet",
                *(["--data", data] if data else []),
                *[a for k in keys for a in ("--set", k)],
            ]
            run_launched(launch_command(dp) + command if dp > 1 else command, f"bench memory: zero={zero}")
            peaks = json.loads((out / "memory.json").read_text())["peak_rss_mib"]
            logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            speed = statistics.median(r["tokens_per_s"] for r in logged[1:] or logged)
            rows.append(
                {"zero": zero, "mmap_mb": mmap_mb, "dp": dp, "peak_rss_mib": peaks, "tokens_per_s": speed}
            )
    return rows


def render_measured(measured: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    accounted = {r["zero"]: r["peak_bytes"] for r in rows if r["recompute"] == "none"}
    base = {r["mmap_mb"]: max(r["peak_rss_mib"]) for r in measured if r["zero"] == 0}
    lines = [
        f"peak resident memory per rank, measured (train at dp {measured[0]['dp']}, a checkpoint at the end)",
        f"{'zero':>4} {'mmap_mb':>7} {'ranks MiB':>22} {'max MiB':>8} {'vs zero=0':>10} {'accounted MB':>13} "
        f"{'tokens/s':>9}",
    ]
    for r in measured:
        peaks = r["peak_rss_mib"]
        ranks = ", ".join(f"{p:,.0f}" for p in peaks)
        tensors = accounted.get(r["zero"], float("nan")) / MB
        lines.append(
            f"{r['zero']:>4} {r['mmap_mb']:>7} {ranks:>22} {max(peaks):>8,.0f} "
            f"{max(peaks) - base[r['mmap_mb']]:>+10,.0f} {tensors:>13.1f} {r['tokens_per_s']:>9,.0f}"
        )
    lines.append("mmap_mb 0: glibc keeps freed tensors' memory for reuse; 1: it returns them (train.mmap_mb)")
    lines.append(
        "accounted: the tensor sum of the table above (parameters, gradients, Adam state, activations)"
    )
    return "\n".join(lines)
