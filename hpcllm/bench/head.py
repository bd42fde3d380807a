"""`hpcllm bench head`: the output head's peak memory and step time at a large vocabulary, its loss
computed whole against `train.loss_chunk` chunks, side by side.

Each variant runs in a fresh child process per repeat (so a process's peak resident memory is its
own), interleaved, with glibc told to map allocations of 1 MB or more (as train.mmap_mb = 1: the
resident peak follows what is live). A child builds the final norm and an untied head [vocab,
width] and random hidden states [1, sequence, width], then runs forward and backward of the norm,
the head and the cross-entropy `steps` times (on the GPU when there is one). Reported: the peak
above what the process held before its first step (`ru_maxrss` on CPU, the allocator's peak on
CUDA), and the median step time after the first.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

MIB = 1 << 20


def child(vocab: int, sequence: int, width: int, chunk: int, steps: int) -> dict[str, Any]:
    """One variant in this process (called in a fresh one by `run`)."""
    import torch
    from torch import nn

    from hpcllm.cluster.runtime import map_large_allocations
    from hpcllm.model.heads import UntiedHead, chunked_loss_sum

    map_large_allocations(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    norm, head = nn.LayerNorm(width).to(device), UntiedHead(width, vocab).to(device)
    hidden = torch.randn(1, sequence, width, generator=generator).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (1, sequence), generator=generator).to(device)
    before = _resident_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        normed = norm(hidden)
        loss = (
            head.loss_sum(head(normed), targets)
            if not chunk
            else chunked_loss_sum(head, normed, targets, None, chunk)
        )
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - started) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"chunk": chunk, "peak_mib": (peak - before) / MIB, "step_ms": statistics.median(times[1:])}


def _resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run(vocab: int, sequence: int, width: int, chunk: int, steps: int, repeat: int) -> list[dict[str, Any]]:
    """Whole and chunked, `repeat` fresh processes each, interleaved."""
    rows = []
    for _ in range(repeat):
        for variant in (0, chunk):
            code = (
                "import json, sys; from hpcllm.bench.head import child; "
                f"print(json.dumps(child({vocab}, {sequence}, {width}, {variant}, {steps})))"
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per chunk size: the median peak and step time over the repeats."""
    by_chunk: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_chunk.setdefault(row["chunk"], []).append(row)
    return {
        str(chunk): {key: statistics.median(r[key] for r in runs) for key in ("peak_mib", "step_ms")}
        for chunk, runs in by_chunk.items()
    }


def render(rows: list[dict[str, Any]], vocab: int, sequence: int, width: int) -> str:
    medians = summary(rows)
    whole = medians["0"]
    lines = [
        f"the head and its loss, forward + backward: vocabulary {vocab:,}, sequence {sequence:,}, "
        f"width {width}",
        f"{'train.loss_chunk':>16} {'peak MiB':>9} {'step ms':>8} {'peak x':>7} {'time x':>7}",
    ]
    for chunk, m in medians.items():
        lines.append(
            f"{chunk if chunk != '0' else 'whole':>16} {m['peak_mib']:>9,.0f} {m['step_ms']:>8,.1f} "
            f"{m['peak_mib'] / whole['peak_mib']:>7.2f} {m['step_ms'] / whole['step_ms']:>7.2f}"
        )
    lines.append("peak: above what the process held before its first step; medians over the repeats")
    return "\n".join(lines)
