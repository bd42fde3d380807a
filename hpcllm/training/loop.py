"""`hpcllm train`: from the command line's arguments to a trained run.

rank discovery (runtime) -> the plan (config checked once with the world) -> the grid (every group,
eagerly) -> the data -> the model, partitioned for TP and cut to this pipeline stage -> optimizer
and Horovod -> the loop: steps, metrics and the plot (rank 0), evaluation, checkpoints, preemption.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcllm.cluster import faults, runtime, watchdog
from hpcllm.cluster.preemption import EXIT_PREEMPTED, Preempted
from hpcllm.data.mixture import components_of, is_mix
from hpcllm.data.tokens import CHAT_TEMPLATE, TOKENIZER, unigram_loss
from hpcllm.errors import UsageError
from hpcllm.observe.metrics import MetricsLog, Throughput, measure_matmul_peak
from hpcllm.observe.progress import Progress
from hpcllm.observe.tensorboard import TensorBoardLog
from hpcllm.parallel import torch_dist
from hpcllm.parallel.grid import Grid
from hpcllm.training import checkpoint, init_from, report
from hpcllm.training import config as config_mod
from hpcllm.training.assemble import assemble_trainer, build_model
from hpcllm.training.optim import learning_rate
from hpcllm.training.plan import (
    Plan,
    check_hybrid_sharding,
    context_parallel_problem,
    default_data_dir,
    make_plan,
)
from hpcllm.training.run_dir import ensure_data, has_checkpoint, open_run_dir, resume_point
from hpcllm.training.trainer import Trainer

log = logging.getLogger("hpcllm.training")


@dataclass
class TrainArgs:
    config: str | None = None
    set: tuple[str, ...] = ()
    data: str | None = None
    out: str | None = None
    steps: int | None = None
    tp: int | None = None
    pp: int | None = None
    cp: int | None = None
    layout: str | None = None  # "auto": the planner chooses (planner.auto)
    resume: bool = False
    timeline: str | None = None
    init_from: str | None = None  # hf:DIR
    quiet: bool = False  # no progress lines or bar while training (the start-up lines and the summary stay)

    def overrides(self) -> dict[str, Any]:
        """The flags that stand for config keys, with their typed values (None = not given)."""
        flags = {
            "train.steps": self.steps,
            "parallel.tp": self.tp,
            "parallel.pp": self.pp,
            "parallel.cp": self.cp,
            "data.mix" if self.data and is_mix(self.data) else "data.path": self.data,
            "horovod.timeline": self.timeline,
            "train.init_from": self.init_from,
        }
        return {key: value for key, value in flags.items() if value is not None}


def train(args: TrainArgs) -> int:
    run_training(args)
    return 0


def _plan(args: TrainArgs, rt: runtime.Runtime) -> tuple[Plan, Path, Any, bool]:
    """Collective: rank 0 opens the run directory and checks the configuration; every rank gets
    the same plan, the Hugging Face folder a run starts from, and whether it continues from a
    checkpoint (a --resume of a run that has none starts it again at step 0), or the same
    one-line error."""

    def decide() -> tuple[Plan, Path, Any, bool]:
        cluster = _auto_layout_profile(args) if args.layout == "auto" else None
        out, saved = open_run_dir(args.out, args.resume)
        from_checkpoint = saved is not None and has_checkpoint(out)
        config = config_mod.load(args.config, args.set, base=saved, overrides=args.overrides())
        # Composed once, in this order, each as if given with --set: the settings, the shape of
        # the folder the run starts from, then the planner's layout for that shape.
        folder = None if from_checkpoint else init_from.source(config)
        assignments = [*args.set, *(folder.model_settings() if folder is not None else [])]
        if folder is not None:
            config = config_mod.load(args.config, assignments, base=saved, overrides=args.overrides())
        if cluster is not None:
            assignments += _auto_layout(config, cluster, rt)
            config = config_mod.load(args.config, assignments, overrides=args.overrides())
        plan = make_plan(config, rt.size, rt.device.type, saved)
        if config.parallel.shard_group == "node":
            check_hybrid_sharding(plan.layout, rt.node_of_rank)
        return plan, out, folder, from_checkpoint

    return runtime.root_decides(rt.comm, decide)


def _auto_layout_profile(args: TrainArgs) -> Any:
    """--layout auto chooses the layout of a new run, from the calibrated profile it returns; any
    refusal comes before anything is written."""
    from hpcllm.planner import profiles

    if args.tp is not None or args.pp is not None:
        raise UsageError("--layout auto chooses tp and pp itself; drop --tp/--pp, or drop --layout auto")
    if args.resume:
        raise UsageError("--layout auto is for a new run; --resume continues in the run's own layout")
    return profiles.load(profiles.LOCAL)


def _auto_layout(config: config_mod.Config, cluster: Any, rt: runtime.Runtime) -> list[str]:
    """The planner's fastest layout for this world as configuration assignments, logged with the
    reasons."""
    from hpcllm.planner import auto

    data = components_of(config.data.path, config.data.mix)[0].path or str(default_data_dir())
    settings, lines = auto.choose(
        config,
        cluster,
        rt.size,
        rt.local_size,
        auto.vocabulary(data),
        problem=lambda layout: context_parallel_problem(config, layout.cp),
    )
    for line in lines:
        log.info("%s", line)
    return settings


def _log_engines(plan: Plan, device: torch.device, grid: Grid) -> None:
    """Which engine carries which traffic."""
    layout = plan.layout

    def engine(backend: str, size: int) -> str:
        if size == 1:
            return "-"
        return f"torch ({torch_dist.backend_for(device.type)})" if backend == "torch" else backend

    log.info(
        "communication: data parallel %s, tensor parallel %s, pipeline %s, context parallel %s",
        f"horovod ({grid.horovod_controller})" if layout.replicas > 1 else "-",
        engine(plan.tp_backend, layout.tp),
        engine(plan.pp_backend, layout.pp),
        engine(plan.cp_backend, layout.cp),
    )


def _start_run_dir(out: Path, plan: Plan) -> None:
    """config.yaml first, whole or not at all, then logs/: a job killed at any moment of its start
    leaves an empty folder (a new start) or a run that --resume continues, never a dead end."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.replace_durably(out / "config.yaml", plan.config.to_yaml().encode())
    (out / "logs").mkdir(exist_ok=True)


def _set_tf32(plan: Plan, device: torch.device) -> None:
    """On CUDA, fp32 matmuls on TF32 tensor cores unless train.tf32 = false."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = plan.config.train.tf32
        torch.backends.cudnn.allow_tf32 = plan.config.train.tf32
        log.info("TF32 for fp32 matmuls: %s (train.tf32)", "on" if plan.config.train.tf32 else "off")


def _set_mmap(plan: Plan) -> None:
    """train.mmap_mb: large allocations returned to the system when freed (runtime.map_large_allocations)."""
    megabytes = plan.config.train.mmap_mb
    if megabytes and not runtime.map_large_allocations(megabytes):
        log.warning("train.mmap_mb = %g needs the GNU C library (glibc): no effect here", megabytes)


def _warn_about_placement(plan: Plan, rt: runtime.Runtime) -> None:
    """TP groups belong inside a node: their allreduces run in every layer's forward and backward."""
    across = plan.layout.tp_groups_across_nodes(rt.node_of_rank)
    if across and rt.rank == 0:
        nodes = sorted({rt.node_of_rank[r] for r in across[0]})
        log.warning(
            "%d tensor-parallel group(s) span nodes (ranks %s on nodes %s): every layer's activations "
            "are allreduced over the interconnect 4 times per micro-batch, far slower than inside a node; "
            "use tp <= ranks per node (%d here)",
            len(across),
            across[0],
            nodes,
            rt.local_size,
        )


def _grid(plan: Plan, rt: runtime.Runtime) -> Grid:
    """Collective: every group the plan communicates in (Horovod and torch.distributed started)."""
    hybrid = plan.config.parallel.shard_group == "node"
    return Grid(
        rt.comm,
        tp=plan.layout.tp,
        pp=plan.layout.pp,
        cp=plan.layout.cp,
        horovod=plan.uses_horovod,
        horovod_tp=plan.horovod_tp,
        horovod_env=plan.horovod_env,
        horovod_controller=plan.horovod_controller,
        torch_device=rt.device.type if plan.torch_groups else None,
        timeout_s=plan.config.train.watchdog_s or 300.0,
        shard_nodes=rt.node_of_rank if hybrid else None,
    )


def run_training(args: TrainArgs) -> Trainer:
    """Collective: set up, train to train.steps, return the trainer (model and all) for inspection."""
    rt = runtime.init()
    # Every check comes before the run directory is created: bad input leaves nothing behind.
    fault = runtime.root_decides(rt.comm, faults.configured)
    plan, out, folder, from_checkpoint = _plan(args, rt)
    grid = _grid(plan, rt)
    data = ensure_data(plan, rt, grid.node_comm)
    if folder is not None:
        runtime.root_decides(rt.comm, lambda: init_from.check_tokenizer(folder, data.primary))
    resumed_at = runtime.root_decides(rt.comm, lambda: resume_point(out, data)) if from_checkpoint else (0, 0)
    runtime.root_decides(rt.comm, lambda: _start_run_dir(out, plan))
    runtime.setup_logging(rt.rank, out)
    if args.resume:  # a checkpoint write that a crash interrupted is never read
        for partial in runtime.root_decides(rt.comm, lambda: checkpoint.discard_partial(out)):
            log.warning("removed %s: a checkpoint write that was interrupted before it completed", partial)
    log.info("%s", rt.describe())
    _log_engines(plan, rt.device, grid)
    _set_tf32(plan, rt.device)
    _set_mmap(plan)
    _warn_about_placement(plan, rt)
    if rt.rank == 0:  # what generation reads: the tokenizer, and the chat template of fine-tuning data
        for name in (TOKENIZER, CHAT_TEMPLATE):
            if (data.primary.path / name).is_file():
                shutil.copyfile(data.primary.path / name, out / name)
    built = build_model(plan, data.primary.vocab_size, rt, grid)
    trainer, start_step = assemble_trainer(
        plan, rt, grid, data, out, built, fault, from_checkpoint, resumed_at
    )
    if folder is not None:  # into the assembled model: fully sharded, its parameters exist only now
        runtime.every_rank_checks(rt.comm, lambda: init_from.load_weights(trainer.model, folder, grid))
        log.info("initialised from %s: %s", folder.path, ", ".join(folder.model_settings()))
    steps = plan.config.train.steps
    if start_step >= steps:  # nothing to train: say so, not "final train loss nan"
        if rt.rank == 0:
            print(
                f"{out} is complete: its checkpoint is at step {start_step} of train.steps = {steps}; "
                f"to train it further, resume with --steps N (more than {start_step})"
            )
        return trainer
    trainer.stop.install()
    watchdog.start(rt.comm, plan.config.train.watchdog_s)
    try:
        _loop(trainer, start_step, resume=args.resume, quiet=args.quiet)
    finally:
        watchdog.stop()
        trainer.stop.uninstall()
    return trainer


def _speed(trainer: Trainer, start_step: int) -> Throughput:
    t, rt = trainer.config.train, trainer.rt
    compute_dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    peak = t.peak_flops or measure_matmul_peak(rt.device, dtype=compute_dtype)
    return Throughput(
        tokens_per_step=t.global_batch * trainer.config.model.block_size,
        flops_per_token=trainer.plan.family.flops_per_token(trainer.model.shape),
        peak_total=rt.comm.allreduce(peak),
        last_step=start_step,
        trained=0 if trainer.data.loss_masked else None,
    )


def _stop_if_asked(trainer: Trainer, done: int, saved: bool, bar: Any) -> None:
    """Every rank agrees whether a stop signal arrived; if so, checkpoint and leave with exit 75."""
    received = trainer.stop.agreed(trainer.rt.comm)
    if not received or done >= trainer.config.train.steps:
        return
    if not saved:
        trainer.save(done)
    trainer.finish_checkpoint()  # exit 75 only once the checkpoint is complete
    bar.close()
    (log.warning if trainer.rt.rank == 0 else log.info)(
        "stopping after step %d on %s: checkpoint written; exit code %d (run again with --resume)",
        done,
        signal.Signals(received).name,
        EXIT_PREEMPTED,
    )
    raise Preempted(done)


def _baseline(trainer: Trainer) -> float | None:
    """The unigram loss recorded at prepare time; data prepared by an older hpcllm is measured now.
    None for fine-tuning data: it counts every token, the loss only the trained ones."""
    if any(d.is_sft for d in trainer.data.datasets):
        return None
    recorded = trainer.data.unigram_loss()
    if recorded is not None:
        return recorded
    log.info("measuring the unigram baseline (one pass over the data; `hpcllm prepare` again records it)")
    primary = trainer.data.primary
    return unigram_loss(primary.tokens("train"), primary.tokens("val"), primary.vocab_size)


def _loop(trainer: Trainer, start_step: int, resume: bool, quiet: bool = False) -> None:
    config, rt = trainer.config, trainer.rt
    t = config.train
    speed = _speed(trainer, start_step)
    baseline = _baseline(trainer) if rt.rank == 0 else None
    report.log_start(trainer)
    metrics = MetricsLog(trainer.run_dir, resume) if rt.rank == 0 else None
    if metrics is not None and resume:
        metrics.truncate_after(start_step)
    board = TensorBoardLog(trainer.run_dir, start_step) if metrics is not None and t.tensorboard else None
    bar = Progress(t.steps, start_step, rt.rank == 0, quiet)
    loss = val_loss = float("nan")
    for step in range(start_step, t.steps):
        done = step + 1
        watchdog.set_step(done)
        faults.before_step(trainer.fault, rt.rank, rt.node_index, done)
        if faults.corrupts(trainer.fault, rt.rank, rt.node_index, done):
            trainer.corrupt_a_parameter()
        result = trainer.train_step(step)
        loss = result.loss
        if speed.trained is not None:
            speed.trained += result.trained
        row: dict[str, Any] | None = None
        if done % t.log_every == 0 or done == t.steps or done == start_step + 1 or result.skipped:
            row = {"step": done, "loss": loss, "lr": learning_rate(step, t), **speed.interval(done)}
            row |= {"grad_norm": result.grad_norm, "skipped_steps": trainer.skipped_steps}
            row["dp"] = trainer.plan.layout.dp  # per row: a run resumed on fewer nodes changes it
            row["phase_ms"] = trainer.timer.take_ms_per_step()
            # Every rank logs its own breakdown: a straggler shows as the rank with little allreduce wait.
            log.debug("step %d: ms per step %s", done, {k: round(v, 1) for k, v in row["phase_ms"].items()})
            bar.logged(row)
        if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            val_loss = trainer.evaluate() or float("nan")
            bar.validated(done, val_loss)
            row = (row or {"step": done, "loss": loss}) | {"val_loss": val_loss}
            scored = trainer.evaluate_tasks()
            if scored:
                log.info("step %d: eval_tasks accuracy %.3f (length-normalised %.3f)", done, *scored.values())
                row |= scored
        if row is not None and metrics is not None:
            metrics.append(row)
            if board is not None:
                board.append(row)
            log.debug("%s", row)
            if "val_loss" in row or done == t.steps:
                metrics.plot(baseline)
        saved = _check_and_checkpoint(trainer, done)
        trainer.poll_checkpoint()
        bar.advance()
        _stop_if_asked(trainer, done, saved, bar)
    trainer.finish_checkpoint()
    bar.close()
    peaks = report.peak_memory(trainer)  # collective; the checkpoints' cost included
    if board is not None:
        board.close()
    if metrics is not None:
        metrics.plot(baseline)
        seconds = time.perf_counter() - speed.started
        flops = (speed.flops_per_token, speed.peak_total)
        report.summary(trainer, metrics, baseline, seconds, flops, loss, val_loss, peaks)


def _check_and_checkpoint(trainer: Trainer, done: int) -> bool:
    """The checkpoint when due (it checks the replicas first), else the replica check when due;
    whether a checkpoint was written."""
    t = trainer.config.train
    saved = bool(t.ckpt_every and (done % t.ckpt_every == 0 or done == t.steps))
    if saved:
        trainer.save(done)
    elif t.check_replicas_every and done % t.check_replicas_every == 0:
        trainer.check_replicas(done)
    return saved
