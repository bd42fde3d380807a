"""What a run tells its user at the start (model, data, layout) and at the end (losses, speed,
where the results are, how to sample from it)."""

from __future__ import annotations

import json
import logging
import resource
from typing import Any

from hpcllm.observe.metrics import MetricsLog
from hpcllm.training import checkpoint
from hpcllm.training.optim import schedule_warning
from hpcllm.training.trainer import Trainer

log = logging.getLogger("hpcllm.training")


def log_start(trainer: Trainer) -> None:
    config = trainer.config
    warning = schedule_warning(config.train)
    if warning and trainer.rt.rank == 0:
        log.warning("%s", warning)
    log.info(
        "model: %.2fM parameters, %s; data: %s train sequences; %d ranks (%s), "
        "%d micro-batches of %d per rank per step",
        trainer.full_parameters / 1e6,
        config.model.preset,
        f"{trainer.train_rows.n_sequences:,}",
        trainer.rt.size,
        trainer.grid.layout,
        trainer.micro_per_step,
        config.train.micro_batch,
    )


def summary(
    trainer: Trainer,
    metrics: MetricsLog,
    baseline: float | None,
    seconds: float,
    flops: tuple[float, float],  # per token, and the peak of all ranks together
    loss: float,
    val_loss: float,
    peaks: list[float],
) -> None:
    rows = [r for r in metrics.rows if "tokens_per_s" in r]
    speeds = sorted(r["tokens_per_s"] for r in rows[1:] or rows)  # the first interval includes start-up
    tokens_per_s = speeds[len(speeds) // 2] if speeds else float("nan")
    flops_token, peak_total = flops
    mfu = tokens_per_s * flops_token / peak_total
    out = trainer.run_dir
    latest = checkpoint.latest(out)
    steps, first = trainer.config.train.steps, trainer.resumed_at[0]
    # After a resume the time covers this session's steps only: say which.
    took = (
        f"in {seconds / 60:.1f} min"
        if not first
        else f"(steps {first + 1}-{steps} in {seconds / 60:.1f} min)"
    )
    # Fine-tuning data has no unigram baseline: its loss counts the trained tokens only.
    reference = " (per trained token)"
    if baseline is not None:
        reference = f"  (unigram baseline {baseline:.3f} nats/token)"
    lines = [
        f"done: {steps} steps {took} on {trainer.rt.size} rank(s) ({trainer.grid.layout})",
        f"  final train loss {loss:.3f}, val loss {val_loss:.3f}{reference}",
        f"  throughput {tokens_per_s:,.0f} tokens/s (median), MFU {mfu:.1%} "
        f"of {peak_total / 1e9:.0f} GFLOP/s measured matmul peak",
        f"  peak memory per rank (resident, as each process saw it): {min(peaks):,.0f}-{max(peaks):,.0f} MiB",
        f"  run directory {out}/: metrics.jsonl, memory.json, loss.png, logs/, "
        f"checkpoints/{latest.name if latest else '-'}",
        f"  sample from it: hpcllm generate --run {out} "
        + ("--chat --prompt 'Hello!'" if any(d.is_sft for d in trainer.data.datasets) else "--prompt 'def '"),
    ]
    mixed = trainer.data
    if len(mixed.datasets) > 1:
        samples = trainer.samples_before(trainer.config.train.steps)
        shares = trainer.sampler.proportions(samples)
        lines.insert(
            2,
            f"  mixture over {samples:,} samples: "
            + ", ".join(
                f"{d.path.name} {share:.1%} (weight {w:.1%})"
                for d, share, w in zip(mixed.datasets, shares, mixed.weights, strict=True)
            ),
        )
    print("\n".join(lines), flush=True)


def peak_memory(trainer: Trainer) -> list[float]:
    """Collective: every rank's peak resident memory so far (MiB, `ru_maxrss`: what the process
    held at its highest, allocator caches, communication buffers and checkpoints included), on
    rank 0, which also writes them to RUN/memory.json; empty elsewhere."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gathered = trainer.rt.comm.gather((peak, trainer.dp.memory_figures()), root=0)
    if trainer.rt.rank != 0:
        return []
    peaks = [peak for peak, _ in gathered]
    row: dict[str, Any] = {
        "step": trainer.config.train.steps,
        "peak_rss_mib": peaks,
        "layout": str(trainer.grid.layout),
    }
    if gathered[0][1]:  # fully sharded: each rank's parameter storage, counted
        row["fully_sharded"] = [figures for _, figures in gathered]
    (trainer.run_dir / "memory.json").write_text(json.dumps(row) + "\n")
    return peaks
