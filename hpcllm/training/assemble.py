"""Putting one rank's training together: its part of the model (only its pipeline stage, then its
tensor-parallel slice), the gradient buckets, the optimizer (sharded with parallel.zero), the
resumed state and the pipeline schedule, handed to the Trainer."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from hpcllm.cluster import faults, runtime
from hpcllm.data.mixture import Mixture
from hpcllm.model.gpt import GPT
from hpcllm.model.partition import partition_tensor_parallel
from hpcllm.observe.memory import tensor_bytes
from hpcllm.parallel.context.ring_attention import held_positions
from hpcllm.parallel.context.transport import ring_for
from hpcllm.parallel.data_parallel import DataParallel
from hpcllm.parallel.fully_sharded import UnitValues
from hpcllm.parallel.gradient_finaliser import GradientFinaliser
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.pipeline.schedules import PipelineStage
from hpcllm.parallel.sharding import sequence_parallel_parameters
from hpcllm.parallel.tensor.collectives import TensorCollectives
from hpcllm.training import checkpoint
from hpcllm.training.optim import BETAS, EPS, make_optimizer, parameter_groups
from hpcllm.training.plan import Plan
from hpcllm.training.trainer import Trainer, autocast_for

log = logging.getLogger("hpcllm.training")


def build_model(
    plan: Plan, vocab_size: int, rt: runtime.Runtime, grid: Grid
) -> tuple[GPT, TensorCollectives, int]:
    """This rank's part of the model: only its pipeline stage is built, initialised to the
    single-process values from the seed, then partitioned for tensor parallelism; with the full
    model's parameter count."""
    torch.manual_seed(plan.config.train.seed)
    shape = plan.model_shape(vocab_size)
    stages = plan.stages(vocab_size)
    layers = stages.layer_range(grid.pp_rank) if grid.layout.pp > 1 else None
    # Fully sharded, the model is a skeleton on the meta device: its units are made one at a time
    # when they are sharded (_unit_builder), so no rank ever holds the whole partition.
    meta = plan.dp_strategy.shards_parameters
    with torch.device("meta") if meta else nullcontext():
        model = plan.family.build(
            shape, plan.config.train.seed, layers, grid.is_first_stage, grid.is_last_stage
        )
    model = model if meta else model.to(rt.device)
    tp_group = TensorCollectives(
        grid.tp_comm,
        plan.tp_backend,
        grid.hvd if plan.horovod_tp else None,
        grid.tp_process_set if plan.horovod_tp else None,
        grid.torch_groups.get("tp"),
    )
    partition_tensor_parallel(model, tp_group, plan.config.parallel.sequence_parallel)
    model.set_recompute(plan.config.train.recompute)
    if grid.layout.cp > 1:  # this rank's chunks of every sequence (parallel.context.ring_attention)
        held = held_positions(plan.config.model.block_size, grid.layout.cp, grid.cp_rank, rt.device)
        ring = ring_for(plan.cp_backend, grid.cp_comm, grid.torch_groups.get("cp"), grid.cp_world_ranks)
        model.enable_context_parallel(ring, held)
    model.loss_chunk = plan.config.train.loss_chunk
    if grid.layout.pp > 1:
        if plan.micro_batches < grid.layout.pp:
            log.warning(
                "only %d micro-batches per step for %d pipeline stages: the stages idle %.0f%% of the time "
                "(bubble (p-1)/(m+p-1)); raise train.global_batch or lower train.micro_batch",
                plan.micro_batches,
                grid.layout.pp,
                100 * plan.bubble,
            )
        log.info(
            "pipeline: %d stages with %s layers (%s schedule)",
            grid.layout.pp,
            stages.layers_per_stage,
            plan.config.parallel.schedule,
        )
    return model, tp_group, plan.family.parameters(shape).total


def _pipeline(plan: Plan, grid: Grid, model: GPT, device: torch.device) -> PipelineStage:
    """This stage's schedule."""
    config = plan.config
    sequence = config.model.block_size // (grid.layout.tp if config.parallel.sequence_parallel else 1)
    sequence //= grid.layout.cp  # context parallelism: this rank's positions of each sequence
    hidden_shape = (config.train.micro_batch, sequence, config.model.n_embd)
    autocast = autocast_for(config.train.dtype, device)
    return PipelineStage(
        model, grid, config.parallel.schedule, hidden_shape, autocast, device, plan.pp_backend
    )


def _gradients(
    plan: Plan, grid: Grid, model: GPT, tp_group: TensorCollectives, device: torch.device
) -> tuple[DataParallel, GradientFinaliser]:
    """The data-parallel strategy's gradient buckets (or fully sharded units) and the finaliser
    around them."""
    config, strategy = plan.config, plan.dp_strategy
    dp = DataParallel(grid, strategy)
    if strategy.shards_parameters:  # first: it replaces the meta parameters
        units = dp.fully_shard(
            model, plan.allreduce_every, _unit_builder(plan, model, tp_group, device), device
        )
        shard_size, copies = grid.dp_shard[1], grid.layout.replicas // grid.dp_shard[1]
        log.info(
            "fully sharded: %d units over %d DP ranks%s, %.1f MB of parameter shares on this rank; "
            "gradients reduce-scattered every %d micro-batch(es)",
            len(units.units),
            shard_size,
            f" of a node, replicated over {copies} nodes (hybrid)" if grid.hybrid else "",
            units.param_shard.numel() * 4 / 1e6,
            plan.allreduce_every,
        )
    # Summed over another group before their DP reduction (the gradient finaliser's steps 1, 2):
    # the tied embedding over the first and last stage, the sequence-parallel parameters over TP.
    tied_over_stages = grid.layout.pp > 1 and model.shape.tie_embeddings and model.wte is not None
    tied = model.wte.weight if tied_over_stages else None
    sequence_parallel = sequence_parallel_parameters(model)
    finaliser = GradientFinaliser(grid, dp, tp_group, tied, sequence_parallel, plan.pp_backend)
    if strategy.shards_parameters:
        return dp, finaliser
    gradients = dp.bucket_gradients(
        model,
        ([tied] if tied is not None else []) + sequence_parallel,
        config.parallel.bucket_mb,
        plan.allreduce_every,
        config.parallel.grad_compression == "fp16",
    )
    log.info(
        "gradients: %d buckets of up to %g MB, reduced %s from backward hooks (data parallel: %s)",
        len(gradients.buckets),
        config.parallel.bucket_mb,
        "by reduce-scatter" if strategy.shards_gradients else "by allreduce",
        strategy.name,
    )
    return dp, finaliser


def _unit_builder(
    plan: Plan, model: GPT, tp_group: TensorCollectives, device: torch.device
) -> UnitValues | None:
    """For a model built on the meta device: each unit's single-process values, cut for this TP
    rank, from a model of that unit's parts alone (every tensor is seeded by its name, so they are
    the whole model's values); the last one built is reused for the units it holds too."""
    if not next(model.parameters()).is_meta:
        return None
    built: dict[tuple[range, bool, bool], dict[str, torch.Tensor]] = {}

    def values(key: str) -> dict[str, torch.Tensor]:
        parts = (range(int(key[5:]), int(key[5:]) + 1) if key.startswith("block") else range(0),)
        parts += (key in ("embedding", "positions"), key == "head")
        if parts not in built:
            built.clear()  # one unit's model at a time
            unit = plan.family.build(model.shape, plan.config.train.seed, *parts).to(device)
            partition_tensor_parallel(unit, tp_group, plan.config.parallel.sequence_parallel)
            built[parts] = {name: param.detach() for name, param in unit.named_parameters()}
        return built[parts]

    return values


def _optimizer(
    plan: Plan, grid: Grid, model: GPT, dp: DataParallel, rank_bytes: int
) -> torch.optim.Optimizer:
    """AdamW, with its state sharded over DP when the strategy says so."""
    config = plan.config
    if not plan.dp_strategy.shards_optimizer:
        return make_optimizer(model, config.train)
    optimizer = dp.sharded_optimizer(parameter_groups(model, config.train), config.train.lr, BETAS, EPS)
    log.info(
        "distributed optimizer: Adam state sharded over dp = %d, %.1f MB on this rank instead of %.1f MB",
        grid.layout.replicas,
        optimizer.state_bytes / 1e6,
        2 * rank_bytes / 1e6,
    )
    return optimizer


def _resume(
    rt: runtime.Runtime,
    grid: Grid,
    out: Path,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    at: tuple[int, int],
) -> None:
    ckpt = checkpoint.latest(out)
    assert ckpt is not None  # checked when the run directory was opened
    runtime.every_rank_checks(rt.comm, lambda: checkpoint.load(ckpt, model, optimizer, grid))
    log.info("resumed from %s at step %d (%d samples consumed)", ckpt, *at)


def assemble_trainer(
    plan: Plan,
    rt: runtime.Runtime,
    grid: Grid,
    data: Mixture,
    out: Path,
    built: tuple[GPT, TensorCollectives, int],
    fault: faults.Fault | None,
    resume: bool,
    resumed_at: tuple[int, int],
) -> tuple[Trainer, int]:
    """Gradient buckets, optimizer, resumed state and the pipeline schedule around the model;
    returns the trainer and the step it starts from."""
    model, tp_group, full_parameters = built
    rank_bytes = tensor_bytes(list(model.parameters()))
    log.info(
        "parameters: %.2fM in the full model (%.1f MB fp32), %.1f MB on this rank (tp = %d, pp = %d)",
        full_parameters / 1e6,
        full_parameters * 4 / 1e6,
        rank_bytes / 1e6,
        grid.layout.tp,
        grid.layout.pp,
    )
    dp, finaliser = _gradients(plan, grid, model, tp_group, rt.device)
    optimizer = _optimizer(plan, grid, model, dp, rank_bytes)
    if resume:
        _resume(rt, grid, out, model, optimizer, resumed_at)
    dp.broadcast_initial_state(model, optimizer)
    pipeline = _pipeline(plan, grid, model, rt.device) if grid.layout.pp > 1 else None
    trainer = Trainer(
        plan, rt, grid, data, out, model, optimizer, dp, finaliser, full_parameters, pipeline,
        fault=fault, resumed_at=resumed_at,
    )  # fmt: skip
    return trainer, resumed_at[0]
