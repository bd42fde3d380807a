"""`hpcllm train`: the training loop.

Per step: this DP rank's micro-batches (from the step-defined sampler) → forward/backward with
gradient accumulation → Horovod averages gradients over the DP group → clip → AdamW step with
warmup + cosine learning rate. The loss logged is the mean over the whole global batch, reduced
over DP, so it does not depend on the layout. Rank 0 writes metrics, the plot and the summary;
every rank of a partition's first replica writes its checkpoint shard.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from hpcllm.cluster import faults, runtime, watchdog
from hpcllm.cluster.preemption import EXIT_PREEMPTED, Preempted, StopFlag
from hpcllm.data import prepare as prepare_mod
from hpcllm.data.loader import BatchSampler, micro_batches
from hpcllm.data.tokens import TOKENIZER, Prepared, open_prepared
from hpcllm.errors import UsageError
from hpcllm.model.gpt import GPT, GPTShape, flops_per_token
from hpcllm.observe.metrics import MetricsLog, measure_matmul_peak, unigram_loss
from hpcllm.observe.timing import PhaseTimer, device_sync
from hpcllm.parallel.data_parallel import DataParallel, check_timeline, horovod_environment
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.pipeline.schedules import PipelineStage, keep_stage, parse_stage_layers, plan_stages
from hpcllm.parallel.tensor.collectives import TensorCollectives
from hpcllm.parallel.tensor.layers import check_tp, clip_grad_norm_, partition_gpt
from hpcllm.training import checkpoint
from hpcllm.training import config as config_mod
from hpcllm.training.config import Config

log = logging.getLogger("hpcllm.training.loop")


@dataclass
class TrainArgs:
    config: str | None = None
    set: tuple[str, ...] = ()
    data: str | None = None
    out: str | None = None
    steps: int | None = None
    tp: int | None = None
    pp: int | None = None
    resume: bool = False
    timeline: str | None = None


# ---- configuration and the run directory --------------------------------------------------


def resolve_config(args: TrainArgs, saved: dict[str, Any] | None) -> Config:
    assignments = list(args.set)
    for key, value in (
        ("train.steps", args.steps),
        ("parallel.tp", args.tp),
        ("parallel.pp", args.pp),
        ("data.path", args.data),
        ("horovod.timeline", args.timeline),
    ):
        if value is not None:
            assignments.append(f"{key}={value}")
    return config_mod.load(args.config, assignments, base=saved)


def default_run_dir() -> Path:
    job = os.environ.get("SLURM_JOB_ID")
    return Path("runs") / (f"job-{job}" if job else time.strftime("%Y%m%d-%H%M%S"))


def open_run_dir(args: TrainArgs) -> tuple[Path, dict[str, Any] | None]:
    """(run directory, saved config when resuming). Refuses to touch a run without --resume."""
    out = Path(args.out) if args.out else default_run_dir()
    saved_config = out / "config.yaml"
    if args.resume:
        if not saved_config.is_file():
            raise UsageError(
                f"--resume: {out} holds no run (config.yaml missing); drop --resume to start one"
            )
        ckpt = checkpoint.latest(out)
        if ckpt is None:
            raise UsageError(
                f"--resume: {out} has no complete checkpoint yet; start the run again without --resume"
            )
        checkpoint.refuse_pickles(ckpt)
        return out, yaml.safe_load(saved_config.read_text())
    if saved_config.exists():
        raise UsageError(
            f"--out {out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty and is not an hpcllm run; choose another directory")
    return out, None


def check_resume_compatible(config: Config, saved: dict[str, Any]) -> None:
    before = saved.get("model", {})
    for key, value in vars(config.model).items():
        if key in before and before[key] != value:
            raise UsageError(
                f"--resume: the run was trained with model.{key}={before[key]}, not {value}; "
                "a checkpoint only loads into the same model"
            )


def default_data_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hpcllm" / "data"
    return (
        cache / f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}-bpe{prepare_mod.tok.DEFAULT_VOCAB_SIZE}"
    )


def ensure_data(config: Config, rt: runtime.Runtime) -> Prepared:
    """The prepared data of data.path; with no path, the default corpus, prepared on first use."""
    path = Path(config.data.path) if config.data.path else default_data_dir()
    if not config.data.path and not (path / "manifest.json").exists():
        log.info("preparing the default corpus (Python's standard library) once, into %s", path)
        options = prepare_mod.PrepareOptions(sources=[], out=path, force=True)
        prepare_mod.set_tokenizer_threads(rt.threads)
        summary = prepare_mod.prepare(options, rt.comm)
        for line in summary.lines():
            log.info("  %s", line)
    config.data.path = str(path)
    root_verified = runtime.root_decides(rt.comm, lambda: open_prepared(path, verify=True).manifest)
    return Prepared(path, root_verified)


# ---- optimisation -------------------------------------------------------------------------


def learning_rate(step: int, config: Config) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    t = config.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (t.lr - t.min_lr)


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, LayerNorm gains or position tables' rows)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=(0.9, 0.95), eps=1e-8)


def build_model(config: Config, vocab_size: int, device: torch.device) -> GPT:
    """The full model, initialised from the seed identically on every rank."""
    torch.manual_seed(config.train.seed)
    m = config.model
    shape = GPTShape(vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd, m.dropout)
    return GPT(shape).to(device)


def autocast_for(config: Config, device: torch.device) -> Callable[[], Any]:
    if config.train.dtype == "bfloat16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def check_pp(config: Config) -> None:
    pp, n_layer = config.parallel.pp, config.model.n_layer
    if pp > n_layer:
        raise UsageError(
            f"pp = {pp} stages but model.n_layer = {n_layer}: every stage needs a layer; lower --pp"
        )
    if config.parallel.stage_layers:
        parse_stage_layers(config.parallel.stage_layers, n_layer, pp)


# ---- the loop -----------------------------------------------------------------------------


@dataclass
class Trainer:
    config: Config
    rt: runtime.Runtime
    grid: Grid
    data: Prepared
    run_dir: Path
    model: GPT
    optimizer: torch.optim.Optimizer
    dp: DataParallel
    micro_per_step: int
    tp_group: TensorCollectives
    full_parameters: int
    pipeline: PipelineStage | None = None
    stop: StopFlag = field(default_factory=StopFlag)
    fault: faults.Fault | None = None  # HPCLLM_FAULT, for the reliability tests
    timer: PhaseTimer = field(init=False)

    def __post_init__(self) -> None:
        t, m = self.config.train, self.config.model
        self.train_tokens = self.data.tokens("train")
        self.sampler = BatchSampler(len(self.train_tokens), m.block_size, t.global_batch, t.seed)
        self.val_tokens = self.data.tokens("val")
        try:
            self.val_sampler: BatchSampler | None = BatchSampler(
                len(self.val_tokens), m.block_size, t.global_batch, t.seed + 1
            )
        except UsageError:
            log.warning("the validation split is shorter than one sequence: no validation loss")
            self.val_sampler = None
        self.autocast = autocast_for(self.config, self.rt.device)
        self.timer = PhaseTimer(device_sync(self.rt.device))

    def _batches(
        self, sampler: BatchSampler, tokens: Any, step: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        indices = sampler.rank_indices(step, self.grid.dp_rank, self.grid.layout.dp)
        device = self.rt.device
        return [
            (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            for x, y in micro_batches(
                tokens, indices, self.config.model.block_size, self.config.train.micro_batch
            )
        ]

    def train_step(self, step: int) -> float:
        lr = learning_rate(step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad()
        timer = self.timer
        with timer.phase("data"):
            batches = self._batches(self.sampler, self.train_tokens, step)
        if self.pipeline is not None:
            with timer.phase("pipeline"):
                loss = self.pipeline.train_step(batches).loss
        else:
            loss = 0.0
            allreduce_every = self.config.horovod.backward_passes_per_step or len(batches)
            for index, (x, y) in enumerate(batches, start=1):
                with timer.phase("forward"):
                    with self.autocast():
                        micro_loss = self.model.loss(self.model(x), y)
                    loss += micro_loss.item() / self.micro_per_step
                with timer.phase("backward"):
                    (micro_loss / self.micro_per_step).backward()
                if index % allreduce_every == 0 and index < len(batches):
                    # Averaging a partial sum is exact: what was averaged before is equal on every
                    # replica, so mean(averaged + local) = averaged + mean(local).
                    with timer.phase("allreduce"):
                        self.dp.synchronize(self.optimizer)
        with timer.phase("allreduce"):
            self.dp.synchronize(self.optimizer)
            if self.pipeline is not None:
                self.pipeline.sum_tied_gradients()
            loss = self.dp.mean(loss)
        with timer.phase("optimizer"):
            if self.config.train.grad_clip > 0:
                pipeline_comm = self.grid.pp_comm if self.pipeline is not None else None
                clip_grad_norm_(self.model, self.config.train.grad_clip, self.tp_group, pipeline_comm)
            with self.dp.step_without_sync(self.optimizer):
                self.optimizer.step()
        timer.step_done()
        return loss

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_sampler is None:
            return None
        self.model.eval()
        losses = []
        for step in range(self.config.train.eval_steps):
            batches = self._batches(self.val_sampler, self.val_tokens, step)
            if self.pipeline is not None:
                losses += [self.pipeline.eval_step(batches)] * len(batches)
                continue
            for x, y in batches:
                with self.autocast():
                    losses.append(self.model.loss(self.model(x), y).item())
        return self.dp.mean(sum(losses) / len(losses))

    def save(self, step: int) -> Path:
        extra = {"config": self.config.to_dict(), "sampler": {"step": step, "seed": self.config.train.seed}}
        return checkpoint.save(
            self.run_dir,
            step,
            self.model,
            self.optimizer,
            self.grid,
            extra,
            self.config.train.keep,
            after_shard=lambda: faults.during_checkpoint(self.fault, self.rt.rank, step),
        )


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="train", disable=None if enabled else True)


def train(args: TrainArgs) -> int:
    run_training(args)
    return 0


def run_training(args: TrainArgs) -> Trainer:
    """Collective: set up, train to train.steps, return the trainer (model and all) for inspection."""
    rt = runtime.init()
    # Every check comes before the run directory is created: bad input leaves nothing behind.
    fault = runtime.root_decides(rt.comm, faults.configured)
    out, saved = runtime.root_decides(rt.comm, lambda: open_run_dir(args))
    config = resolve_config(args, saved)
    if saved is not None:
        check_resume_compatible(config, saved)
    check_tp(config.model.n_head, config.model.n_embd, config.parallel.tp)
    check_pp(config)
    runtime.root_decides(rt.comm, lambda: check_timeline(config.horovod.timeline))
    rt.configure_horovod(horovod_environment(config.horovod))
    grid = Grid(rt.comm, tp=config.parallel.tp, pp=config.parallel.pp, horovod=lambda: rt.horovod)
    micro_per_step = config_mod.check_batch_layout(config, grid.layout.dp)
    data = ensure_data(config, rt)
    runtime.root_decides(rt.comm, lambda: (out / "logs").mkdir(parents=True, exist_ok=True))
    runtime.setup_logging(rt.rank, out)
    log.info("%s", rt.describe())
    if rt.rank == 0:
        config.dump(out / "config.yaml")
        shutil.copyfile(data.tokenizer_path, out / TOKENIZER)

    model = build_model(config, data.vocab_size, rt.device)
    full_parameters = model.num_parameters()
    tp_group = TensorCollectives(grid.tp_comm, cuda_backend=lambda: (rt.horovod, grid.tp_process_set))
    partition_gpt(model, tp_group)
    pipeline = None
    if grid.layout.pp > 1:
        plan = plan_stages(model, grid.layout.pp, config.parallel.stage_layers)
        keep_stage(model, plan, grid.pp_rank, grid.layout.pp)
        if micro_per_step < grid.layout.pp:
            bubble = (grid.layout.pp - 1) / (micro_per_step + grid.layout.pp - 1)
            log.warning(
                "only %d micro-batches per step for %d pipeline stages: the stages idle %.0f%% of the time "
                "(bubble (p-1)/(m+p-1)); raise train.global_batch or lower train.micro_batch",
                micro_per_step,
                grid.layout.pp,
                100 * bubble,
            )
        log.info(
            "pipeline: %d stages with %s layers (%s schedule)",
            grid.layout.pp,
            plan.layers_per_stage,
            config.parallel.schedule,
        )
    rank_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log.info(
        "parameters: %.2fM in the full model (%.1f MB fp32), %.1f MB on this rank (tp = %d)",
        full_parameters / 1e6,
        full_parameters * 4 / 1e6,
        rank_bytes / 1e6,
        grid.layout.tp,
    )
    optimizer = make_optimizer(model, config)
    dp = DataParallel(grid, rt.horovod if grid.layout.dp > 1 else None)
    optimizer = dp.wrap_optimizer(optimizer, model, micro_per_step, config.horovod)
    start_step = 0
    if args.resume:
        ckpt = checkpoint.latest(out)
        assert ckpt is not None  # checked in open_run_dir
        for partial in runtime.root_decides(rt.comm, lambda: checkpoint.discard_partial(out)):
            log.warning("removed %s: a checkpoint write that was interrupted before it completed", partial)
        start_step = runtime.every_rank_checks(
            rt.comm, lambda: checkpoint.load(ckpt, model, optimizer, grid)
        )["step"]
        log.info("resumed from %s at step %d", ckpt, start_step)
    dp.broadcast_initial_state(model, optimizer)
    if grid.layout.pp > 1:
        m = config.model
        pipeline = PipelineStage(
            model,
            grid,
            config.parallel.schedule,
            (config.train.micro_batch, m.block_size, m.n_embd),
            autocast_for(config, rt.device),
            rt.device,
        )

    trainer = Trainer(
        config,
        rt,
        grid,
        data,
        out,
        model,
        optimizer,
        dp,
        micro_per_step,
        tp_group,
        full_parameters,
        pipeline,
        fault=fault,
    )
    trainer.stop.install()
    watchdog.start(rt.comm, config.train.watchdog_s)
    try:
        _loop(trainer, start_step, resume=args.resume)
    finally:
        watchdog.stop()
        trainer.stop.uninstall()
    return trainer


def _loop(trainer: Trainer, start_step: int, resume: bool) -> None:
    config, rt = trainer.config, trainer.rt
    t = config.train
    n_params = trainer.full_parameters
    tokens_per_step = t.global_batch * config.model.block_size
    flops_token = flops_per_token(trainer.model.shape, n_params)
    compute_dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    peak = t.peak_flops or measure_matmul_peak(rt.device, dtype=compute_dtype)
    peak_total = rt.comm.allreduce(peak)
    baseline = (
        unigram_loss(trainer.train_tokens, trainer.val_tokens, trainer.data.vocab_size)
        if rt.rank == 0
        else None
    )
    log.info(
        "model: %.2fM parameters, %s; data: %s train tokens; %d ranks (%s), "
        "%d micro-batches of %d per rank per step",
        n_params / 1e6,
        config.model.preset,
        f"{len(trainer.train_tokens):,}",
        rt.size,
        trainer.grid.layout,
        trainer.micro_per_step,
        t.micro_batch,
    )
    metrics = MetricsLog(trainer.run_dir, resume) if rt.rank == 0 else None
    if metrics is not None and resume:
        metrics.truncate_after(start_step)
    bar = _progress(t.steps, start_step, rt.rank == 0)
    stop = trainer.stop
    started = last_time = time.perf_counter()
    last_step = start_step
    loss = val_loss = float("nan")
    for step in range(start_step, t.steps):
        done = step + 1
        watchdog.set_step(done)
        faults.before_step(trainer.fault, rt.rank, done)
        loss = trainer.train_step(step)
        row: dict[str, Any] | None = None
        if done % t.log_every == 0 or done == t.steps or done == start_step + 1:
            now = time.perf_counter()
            tokens_per_s = (done - last_step) * tokens_per_step / max(now - last_time, 1e-9)
            last_time, last_step = now, done
            mfu = tokens_per_s * flops_token / peak_total
            row = {
                "step": done,
                "loss": loss,
                "lr": learning_rate(step, config),
                "tokens_per_s": tokens_per_s,
                "mfu": mfu,
                "elapsed_s": now - started,
                "phase_ms": trainer.timer.take_ms_per_step(),
            }
            # Every rank logs its own breakdown: a straggler shows as the rank with little allreduce wait.
            log.debug("step %d: ms per step %s", done, {k: round(v, 1) for k, v in row["phase_ms"].items()})
            bar.set_postfix_str(f"loss {loss:.3f} | {tokens_per_s:,.0f} tok/s | MFU {mfu:.1%}", refresh=False)
        if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            val_loss = trainer.evaluate() or float("nan")
            row = (row or {"step": done, "loss": loss}) | {"val_loss": val_loss}
        if row is not None and metrics is not None:
            metrics.append(row)
            log.debug("%s", row)
            if "val_loss" in row or done == t.steps:
                metrics.plot(baseline)
        saved = bool(t.ckpt_every and (done % t.ckpt_every == 0 or done == t.steps))
        if saved:
            trainer.save(done)
        bar.update(1)
        received = stop.agreed(rt.comm)
        if received and done < t.steps:
            if not saved:
                trainer.save(done)
            bar.close()
            (log.warning if rt.rank == 0 else log.info)(
                "stopping after step %d on %s: checkpoint written; exit code %d (run again with --resume)",
                done,
                signal.Signals(received).name,
                EXIT_PREEMPTED,
            )
            raise Preempted(done)
    bar.close()
    if metrics is not None:
        metrics.plot(baseline)
        seconds = time.perf_counter() - started
        _summary(trainer, metrics, baseline, seconds, (flops_token, peak_total), loss, val_loss)


def _summary(
    trainer: Trainer,
    metrics: MetricsLog,
    baseline: float | None,
    seconds: float,
    flops: tuple[float, float],  # per token, and the peak of all ranks together
    loss: float,
    val_loss: float,
) -> None:
    rows = [r for r in metrics.rows if "tokens_per_s" in r]
    speeds = sorted(r["tokens_per_s"] for r in rows[1:] or rows)  # the first interval includes start-up
    tokens_per_s = speeds[len(speeds) // 2] if speeds else float("nan")
    flops_token, peak_total = flops
    mfu = tokens_per_s * flops_token / peak_total
    out = trainer.run_dir
    latest = checkpoint.latest(out)
    lines = [
        f"done: {trainer.config.train.steps} steps in {seconds / 60:.1f} min on {trainer.rt.size} rank(s) "
        f"({trainer.grid.layout})",
        f"  final train loss {loss:.3f}, val loss {val_loss:.3f}  "
        f"(unigram baseline {baseline:.3f} nats/token)",
        f"  throughput {tokens_per_s:,.0f} tokens/s (median), MFU {mfu:.1%} "
        f"of {peak_total / 1e9:.0f} GFLOP/s measured matmul peak",
        f"  run directory {out}/: metrics.jsonl, loss.png, logs/, "
        f"checkpoints/{latest.name if latest else '-'}",
        f"  sample from it: hpcllm generate --run {out} --prompt 'def '",
    ]
    print("\n".join(lines), flush=True)
