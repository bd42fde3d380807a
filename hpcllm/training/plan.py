"""The plan: the configuration checked once, together with the world, into everything a run needs.

`make_plan` is the only place a training configuration is validated against the world: the layout,
tensor-parallel divisibility, the pipeline stage split, the batch layout, the gradient-reduction
cadence, the backends, Horovod's environment, resume compatibility. Everything downstream reads the
frozen `Plan`; nothing changes it afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hpcllm.data import mixture, tokenizer
from hpcllm.errors import UsageError
from hpcllm.model.family import ModelFamily
from hpcllm.model.registry import family_of
from hpcllm.observe import tensorboard
from hpcllm.parallel import horovod
from hpcllm.parallel.dp_strategy import DataParallelStrategy, strategy_for
from hpcllm.parallel.layout import Layout
from hpcllm.parallel.pipeline.partition import StagePlan, parse_stage_layers
from hpcllm.training.config import Config, DataConfig


@dataclass(frozen=True)
class Plan:
    config: Config  # validated; data.path resolved (the default corpus's cache when none was given)
    layout: Layout
    micro_batches: int  # micro-batches per rank per step
    allreduce_every: int  # micro-batches between data-parallel gradient reductions
    tp_backend: str  # mpi4py | horovod | torch (auto resolved by device)
    pp_backend: str  # mpi4py | torch (auto resolved by device)
    cp_backend: str  # mpi4py | torch (auto resolved by device)
    horovod_env: dict[str, str]  # Horovod's knobs, set once when it starts
    horovod_controller: str  # mpi | gloo | auto (on CPU: resolved by the hosts when Horovod starts)
    default_data: bool  # data.path was empty: prepare the default corpus there on first use
    dp_strategy: DataParallelStrategy  # how DP replicas share the step (parallel.zero)

    @property
    def horovod_tp(self) -> bool:
        """Tensor-parallel collectives go through Horovod (and need its TP process sets)."""
        return self.tp_backend == "horovod" and self.layout.tp > 1

    @property
    def torch_groups(self) -> bool:
        """Some traffic goes through torch.distributed (and needs its process groups)."""
        return (
            (self.tp_backend == "torch" and self.layout.tp > 1)
            or (self.pp_backend == "torch" and self.layout.pp > 1)
            or (self.cp_backend == "torch" and self.layout.cp > 1)
        )

    @property
    def uses_horovod(self) -> bool:
        return self.layout.replicas > 1 or self.horovod_tp

    @property
    def bubble(self) -> float:
        """The pipeline's idle fraction, (p - 1) / (m + p - 1)."""
        p, m = self.layout.pp, self.micro_batches
        return (p - 1) / (m + p - 1)

    @property
    def family(self) -> ModelFamily:
        return family_of(self.config.model)

    def model_shape(self, vocab_size: int) -> Any:
        return self.family.shape(self.config.model, vocab_size)

    def stages(self, vocab_size: int) -> StagePlan:
        """Layers per pipeline stage (balancing needs the vocabulary, known once the data is)."""
        shape = self.model_shape(vocab_size)
        return self.family.plan_stages(shape, self.layout.pp, self.config.parallel.stage_layers)


def default_data_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hpcllm" / "data"
    version = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return cache / f"stdlib-{version}-bpe{tokenizer.DEFAULT_VOCAB_SIZE}"


def _check_resume_compatible(config: Config, saved: dict[str, Any]) -> None:
    seed = saved.get("train", {}).get("seed", config.train.seed)
    if seed != config.train.seed:
        raise UsageError(
            f"--resume: the run drew its data order with train.seed={seed}, not {config.train.seed}; "
            "resuming with another seed would repeat and skip data: keep the seed"
        )
    before = saved.get("model", {})
    for key, value in vars(config.model).items():
        if key in before and before[key] != value:
            raise UsageError(
                f"--resume: the run was trained with model.{key}={before[key]}, not {value}; "
                "a checkpoint only loads into the same model"
            )


def _batch_layout(config: Config, dp: int) -> int:
    """Micro-batches per rank per step; the global batch must split evenly over dp × micro_batch."""
    t = config.train
    if t.global_batch % (dp * t.micro_batch):
        raise UsageError(
            f"train.global_batch {t.global_batch} is not divisible by dp × train.micro_batch = "
            f"{dp} × {t.micro_batch} = {dp * t.micro_batch}; change one of them"
        )
    return t.global_batch // (dp * t.micro_batch)


def _allreduce_every(config: Config, micro: int) -> int:
    every = config.parallel.reduce_every
    if every and micro % every:
        raise UsageError(
            f"parallel.reduce_every {every} does not divide the {micro} micro-batches per rank "
            "per step; choose a divisor of it, or 0 for one allreduce per step"
        )
    if config.parallel.zero == 3:  # fully sharded: no whole gradient is kept unless asked for
        return every or 1
    return every or micro


def _check_stages(config: Config, pp: int) -> None:
    n_layer = config.model.n_layer
    if pp > n_layer:
        raise UsageError(
            f"pp = {pp} stages but model.n_layer = {n_layer}: every stage needs a layer; lower --pp"
        )
    if config.parallel.stage_layers:
        parse_stage_layers(config.parallel.stage_layers, n_layer, pp)


def _backend(key: str, choice: str, device_type: str) -> str:
    """auto: torch.distributed (NCCL) on CUDA; on CPU mpi4py, measured fastest there
    (docs/benchmarks.md). mpi4py on CUDA needs an MPI that takes device buffers."""
    if choice == "auto":
        return "torch" if device_type == "cuda" else "mpi4py"
    if choice == "mpi4py" and device_type == "cuda" and not mpi_takes_cuda_buffers():
        raise UsageError(
            f"{key}=mpi4py on CUDA needs a CUDA-aware MPI, and this one is not; use torch (NCCL) or auto"
        )
    return choice


def _controller(choice: str, device_type: str, hierarchical: bool) -> str:
    """auto: mpi on CUDA, where NCCL moves the data and MPI only negotiates, and for hierarchical
    allreduce, which Horovod does with MPI only; on CPU left to Horovod's start, which takes gloo
    on one host, so that its background thread makes no MPI calls while the main thread makes
    its own (docs/reliability.md), and mpi across hosts."""
    if choice == "auto":
        return "mpi" if device_type == "cuda" or hierarchical else "auto"
    if choice == "gloo" and hierarchical:
        raise UsageError(
            "horovod.hierarchical_allreduce needs Horovod's MPI controller; "
            "set horovod.controller=mpi (or auto), or turn hierarchical_allreduce off"
        )
    return choice


def mpi_takes_cuda_buffers() -> bool:
    """Whether the MPI under mpi4py is CUDA-aware: MPI 4.1's query where mpi4py has it, else
    Open MPI's own answer (`ompi_info`, as Open MPI documents)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return False
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        return bool(query())
    if "Open MPI" not in MPI.Get_library_version() or shutil.which("ompi_info") is None:
        return False
    info = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True, text=True)
    return "mpi_built_with_cuda_support:value:true" in info.stdout


def _check_zero(config: Config, dp: int) -> None:
    if config.parallel.shard_group != "world" and config.parallel.zero != 3:
        raise UsageError(
            f"parallel.shard_group={config.parallel.shard_group} chooses where fully sharded parameters are "
            f"split, but parallel.zero={config.parallel.zero}: set parallel.zero=3, or drop it"
        )
    if not config.parallel.zero:
        return
    if dp == 1:
        raise UsageError(
            f"parallel.zero={config.parallel.zero} shards the optimizer state over data-parallel replicas, "
            "but dp = 1: "
            "run more ranks than tp × pp, or set parallel.zero=0"
        )
    if config.parallel.grad_compression != "none":
        raise UsageError(
            f"parallel.grad_compression={config.parallel.grad_compression} applies to allreduced gradients; "
            f"the distributed optimizer (parallel.zero={config.parallel.zero}) reduces fp32 gradients: "
            "drop one of them"
        )


def _check_context_parallel(config: Config, cp: int) -> None:
    """What ring attention does not do yet is refused before anything starts."""
    problem = context_parallel_problem(config, cp)
    if problem:
        raise UsageError(problem)


def context_parallel_problem(config: Config, cp: int) -> str | None:
    """Why `config` cannot run at context-parallel size `cp` (None: it can)."""
    if cp == 1:
        return None
    block = config.model.block_size
    if block % (2 * cp):
        return (
            f"parallel.cp={cp} cuts each sequence into 2 x cp = {2 * cp} chunks, but model.block_size "
            f"{block} does not divide by {2 * cp}; choose a block size or cp that does"
        )
    unsupported = (("model.dropout", config.model.dropout),)
    for key, value in unsupported:
        if value:
            return (
                f"parallel.cp={cp} (context parallelism) does not support {key}={value} yet; drop one of them"
            )
    return None


def check_hybrid_sharding(layout: Layout, node_of_rank: list[int]) -> None:
    """parallel.shard_group=node needs every node to hold as many ranks of each DP group, two or more."""
    try:
        shards, _ = layout.hybrid_dp_groups(node_of_rank)
    except ValueError as exc:
        raise UsageError(
            f"parallel.shard_group=node splits each data-parallel group by node, but {exc}: "
            "run as many ranks on every node, or use parallel.shard_group=world"
        ) from exc
    if len(shards[0]) == 1:
        raise UsageError(
            "parallel.shard_group=node shards over the data-parallel ranks of a node, but each node holds "
            "one of them: nothing to shard; use parallel.shard_group=world or more ranks per node"
        )


def _check_sequence_parallel(config: Config, tp: int, cp: int) -> None:
    if not config.parallel.sequence_parallel:
        return
    if config.train.loss_chunk:
        raise UsageError(
            f"train.loss_chunk={config.train.loss_chunk} cuts the head's tokens into chunks, which "
            "parallel.sequence_parallel does not support yet (its head gathers the sequence): drop one"
        )
    if tp == 1:
        raise UsageError(
            "parallel.sequence_parallel splits the sequence over the tensor-parallel group, but tp = 1: "
            "use --tp 2 or more, or drop it"
        )
    held = config.model.block_size // cp  # context parallelism: each rank holds 1/cp of it
    if held % tp:
        of = f"model.block_size {config.model.block_size}" + (f" / cp {cp} = {held}" if cp > 1 else "")
        raise UsageError(f"parallel.sequence_parallel: {of} is not divisible by tp = {tp}")


def _absolute_data(data: DataConfig, resuming: bool) -> DataConfig:
    """data.path and data.mix's directories as absolute paths, so that config.yaml resumes from any
    working directory; a resumed run whose data is not where it was says how to point at it."""

    def absolute(path: str) -> str:
        found = Path(path).expanduser().absolute()
        if resuming and not found.is_dir():
            raise UsageError(
                f"--resume: the run's data {found} is not there (moved or deleted?); pass --data with its "
                "new place (it is checked to be the same data)"
            )
        return str(found)

    if data.mix:
        items = (item.strip().rpartition(":") for item in data.mix.split(","))
        return replace(data, mix=",".join(f"{absolute(path)}:{weight}" for path, _, weight in items))
    return replace(data, path=absolute(data.path)) if data.path else data


def check_timeline(path: str) -> None:
    """Horovod only logs an error and goes on without a timeline it cannot open: refuse it up front."""
    if path and not Path(path).resolve().parent.is_dir():
        raise UsageError(f"timeline {path}: directory {Path(path).parent} does not exist; create it first")


def make_plan(
    config: Config, world: int, device_type: str = "cpu", saved: dict[str, Any] | None = None
) -> Plan:
    """Check `config` against a world of `world` ranks; bad input raises UsageError (exit 2)."""
    if saved is not None:
        _check_resume_compatible(config, saved)
    p = config.parallel
    layout = Layout.for_world(world, tp=p.tp, pp=p.pp, cp=p.cp)
    _check_context_parallel(config, p.cp)
    family_of(config.model).check(config.model, p.tp)
    _check_stages(config, p.pp)
    micro = _batch_layout(config, layout.dp)
    every = _allreduce_every(config, micro)
    _check_zero(config, layout.replicas)
    _check_sequence_parallel(config, p.tp, p.cp)
    check_timeline(config.horovod.timeline)
    if config.train.tensorboard:
        tensorboard.check_installed()
    h = config.horovod
    controller = _controller(h.controller, device_type, h.hierarchical_allreduce)
    mixture.components_of(config.data.path, config.data.mix)  # bad weights end here, before any work
    config = replace(config, data=_absolute_data(config.data, resuming=saved is not None))
    default_data = not config.data.path and not config.data.mix
    if default_data:
        config = replace(config, data=replace(config.data, path=str(default_data_dir())))
    return Plan(
        config=config,
        layout=layout,
        micro_batches=micro,
        allreduce_every=every,
        tp_backend=_backend("parallel.tp_backend", config.parallel.tp_backend, device_type),
        pp_backend=_backend("parallel.pp_backend", config.parallel.pp_backend, device_type),
        cp_backend=_backend("parallel.cp_backend", config.parallel.cp_backend, device_type),
        horovod_env=horovod.environment(
            h.fusion_threshold_mb,
            h.cycle_time_ms,
            h.timeline,
            h.hierarchical_allreduce,
        ),
        horovod_controller=controller,
        default_data=default_data,
        dp_strategy=strategy_for(config.parallel.zero),
    )
