"""Run configuration: defaults ← model preset ← HPCLLM_DEFAULTS ← YAML file ← `--set key=value` ← flags.

Keys are `section.name` (model, train, parallel, horovod, data). An unknown key is bad input, answered with
the nearest valid key. Values given on the command line are parsed as YAML scalars (`3e-4`, `true`).
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from hpcllm.errors import UsageError
from hpcllm.model import registry

log = logging.getLogger("hpcllm.config")

# Every family's presets, by name (shape keys only; model.family comes with the preset).
PRESETS: dict[str, dict[str, Any]] = {name: keys for name, (_, keys) in registry.PRESETS.items()}


RECOMPUTE = ("none", "selective", "full")
ZERO = (0, 1, 2, 3)
TP_BACKENDS = ("auto", "mpi4py", "horovod", "torch")
HOROVOD_CONTROLLERS = ("auto", "mpi", "gloo")

# Old keys that still work for a release, with a one-line note: key -> (new key, value mapping).
DEPRECATED: dict[str, tuple[str, Any]] = {
    "horovod.backward_passes_per_step": ("parallel.reduce_every", lambda value: value),
    "horovod.fp16_compression": (
        "parallel.grad_compression",
        lambda value: ("fp16" if value else "none") if isinstance(value, bool) else value,
    ),
}
PP_BACKENDS = ("auto", "mpi4py", "torch")


@dataclass(frozen=True)
class ModelConfig:
    family: str = "gpt2"  # gpt2 (hpcllm.model.registry lists the families)
    preset: str = "tiny"
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    # The Llama family's keys (model.family = llama); GPT-2 refuses any of them set otherwise.
    n_kv_head: int = 0  # grouped-query attention: key/value heads (0 = n_head, plain multi-head)
    head_dim: int = 0  # 0 = n_embd / n_head
    ffn_hidden: int = 0  # SwiGLU width (0 = 8/3 n_embd, rounded up to a multiple of 64)
    rope_theta: float = 10000.0
    # Llama 3's RoPE frequency scaling, Hugging Face's rope_scaling keys: "factor=32,low_freq_factor=1,
    # high_freq_factor=4,original_max_position_embeddings=8192"; "" = none
    rope_scaling: str = ""
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the output head is the token embedding (GPT-2 always)
    attention_bias: bool = False  # biases on q, k, v and the output projection
    mlp_bias: bool = False


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    global_batch: int = 32  # sequences per optimizer step, over all DP ranks
    micro_batch: int = 8  # sequences per forward/backward on one rank
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 40  # when not given: a tenth of train.steps (40 of the default 400)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    eval_every: int = 100
    eval_steps: int = 8
    log_every: int = 10
    ckpt_every: int = 200
    keep: int = 2
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    peak_flops: float = 0.0  # per rank, for MFU; 0 = measure a matmul at start
    watchdog_s: float = 300.0  # end the job when a rank waits this long in a collective; 0 = off
    # auto: in the background on GPUs (the CPU is free while they compute), before training goes on
    # on CPUs (the write needs the cores training uses: measured no faster, and it costs a host copy)
    async_checkpoint: str = "auto"  # auto | true | false
    check_replicas_every: int = 100  # compare DP replicas bitwise (and before a checkpoint); 0 = off
    recompute: str = "none"  # none | selective (the attention core) | full (each block): in backward
    tf32: bool = True  # on CUDA, fp32 matmuls and convolutions on TF32 tensor cores
    # glibc: allocations of this many MB or more are mapped from the system and returned to it when
    # freed, so the resident memory follows what is live (0 = glibc's own, adaptive threshold, which
    # keeps freed tensors' memory for reuse: faster, with up to a third more resident memory)
    mmap_mb: float = 0.0
    # tokens per chunk of the head and its loss in training: each chunk's logits are made, reduced and
    # made again in backward, so they never exist whole (0 = the whole micro-batch at once)
    loss_chunk: int = 0
    tensorboard: bool = False  # also write the logged metrics as TensorBoard events in RUN/tensorboard
    # hf:DIR (a Hugging Face GPT-2 or Llama folder) or run:DIR[@STEP] (an hpcllm run's checkpoint, with
    # a fresh optimizer): the new run's shape and weights
    init_from: str = ""
    # multiple-choice examples (JSONL, hpcllm.data.choices) scored at every eval_every step
    eval_tasks: str = ""


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallelism: each sequence split over this many ranks (ring attention)
    schedule: str = "1f1b"
    tp_backend: str = "auto"  # auto | mpi4py | horovod | torch: auto = mpi4py on CPU, torch (NCCL) on CUDA
    pp_backend: str = "auto"  # auto | mpi4py | torch: auto = mpi4py on CPU, torch (NCCL) on CUDA
    cp_backend: str = "auto"  # the context-parallel ring: as pp_backend
    stage_layers: str = ""  # layers per pipeline stage, e.g. "3,1"; empty = balanced by parameters
    # 1: shard the Adam state over the data-parallel group; 2: and reduce-scatter gradients;
    # 3: and shard the parameters, gathered unit by unit (fully sharded data parallelism)
    zero: int = 0
    # zero = 3: shard over the whole DP group (world), or over its ranks on each node and replicate
    # across nodes (node: hybrid sharding, HSDP; the gathers stay on a node's links)
    shard_group: str = "world"
    bucket_mb: float = 25.0  # gradient bucket size: each bucket's reduction starts when it is complete
    sequence_parallel: bool = False  # with tp > 1: split the sequence between the TP layers
    # micro-batches per data-parallel gradient reduction; 0 = once per step (zero = 3: every micro-batch)
    reduce_every: int = 0
    grad_compression: str = "none"  # none | fp16: send allreduced gradient buckets as fp16


@dataclass(frozen=True)
class HorovodConfig:
    """Horovod's data-parallel gradient allreduce (docs/benchmarks.md measures each knob)."""

    fusion_threshold_mb: float = 128.0  # fusion buffer; 0 turns tensor fusion off (Horovod default 128)
    # how often the background thread negotiates and batches ready tensors; 0 = auto: 1 ms with the
    # MPI controller (Horovod's default), 5 ms with Gloo, whose TCP negotiation costs more per cycle
    cycle_time_ms: float = 0.0
    timeline: str = ""  # write Horovod's timeline (chrome://tracing JSON) to this file, from rank 0
    hierarchical_allreduce: bool = False  # reduce inside each node first, then across (NCCL/GPU jobs)
    # who negotiates and moves the DP reductions: auto = gloo on CPU (Horovod's thread then never
    # calls MPI beside the main thread's collectives), mpi on CUDA; docs/reliability.md
    controller: str = "auto"


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a prepared directory; empty = the default corpus, prepared on first use
    mix: str = ""  # instead of path: prepared directories with weights, "DIR:0.7,DIR:0.3" (data/mixture.py)
    stage_dir: str = ""  # copy the data here once per node first ({node} = node index; $VARS expanded)
    # Fine-tuning samples: several per row, each attending only to itself (false: one per row, padded)
    packing: bool = True
    # Token streams: each document attends only to itself, positions restarting (Llama 3's way)
    document_mask: bool = False


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    horovod: HorovodConfig = field(default_factory=HorovodConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def valid_keys() -> list[str]:
    defaults = Config()
    return [f"{s.name}.{f.name}" for s in fields(defaults) for f in fields(getattr(defaults, s.name))]


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Give `value` the type of the default; a value of the wrong kind is bad input."""
    kind = type(current)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is str and isinstance(value, bool):  # YAML reads true/false as booleans
        return str(value).lower()
    elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e9" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise UsageError(f"{key} must be {article} {kind.__name__}, not {value!r}")


def _check_key(key: str) -> None:
    if key not in valid_keys():
        close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(valid_keys())}"
        raise UsageError(f"unknown config key {key!r}{hint}")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def _renamed(values: dict[str, Any], given: set[str]) -> None:
    """Move deprecated keys to their new names, in place; a note for each one the user gave (a
    saved run's config.yaml from an older release is moved silently)."""
    for old, (new, convert) in DEPRECATED.items():
        if old not in values:
            continue
        value = values.pop(old)
        if old in given:
            log.warning("%s is deprecated and goes in the next release: use %s", old, new)
            if new not in given:
                values[new] = convert(value)
        else:
            values.setdefault(new, convert(value))


def parse_assignment(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {text}: the value is not valid YAML ({exc.problem})") from exc
    return key.strip(), value


DEFAULTS_VARIABLE = "HPCLLM_DEFAULTS"


def _read_file(file: Path, what: str) -> dict[str, Any]:
    """A YAML file of sections (model:, train:, ...), flattened to key: value."""
    if not file.is_file():
        raise UsageError(f"{what} {file} does not exist")
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{what} {file} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise UsageError(f"{what} {file} must hold a mapping of sections (model:, train:, ...)")
    return _flatten(tree)


def load(
    path: str | Path | None = None,
    assignments: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build and check the config, in this order of precedence (last wins): defaults, the file that
    HPCLLM_DEFAULTS names (a site's or a user's own defaults; not on resume, whose `base` already
    holds what they set), `base` (a saved run's config, on resume), the YAML file, `--set`
    assignments, then `overrides` (typed values of command-line flags). A preset fills the
    model's shape; explicit model keys override it."""
    values: dict[str, Any] = _flatten(base) if base else {}
    if base is None and os.environ.get(DEFAULTS_VARIABLE):
        values.update(_read_file(Path(os.environ[DEFAULTS_VARIABLE]), f"{DEFAULTS_VARIABLE} file"))
    if path is not None:
        values.update(_read_file(Path(path), "config file"))
    values.update(dict(parse_assignment(a) for a in assignments))
    values.update(overrides or {})
    _renamed(values, given=set(values) - set(_flatten(base) if base else {}))
    defaults = Config()
    _scale_warmup(values, defaults.train.steps)
    preset = values.get("model.preset", defaults.model.preset)
    if preset not in PRESETS:
        raise UsageError(f"unknown model.preset {preset!r}; choose one of {', '.join(PRESETS)}")
    family, shape = registry.PRESETS[preset]
    sections: dict[str, dict[str, Any]] = {"model": {"family": family, **shape}}
    for key, value in values.items():
        _check_key(key)
        section_name, _, name = key.partition(".")
        current = getattr(getattr(defaults, section_name), name)
        sections.setdefault(section_name, {})[name] = _coerce(key, value, current)
    config = replace(
        defaults,
        **{name: replace(getattr(defaults, name), **fields_) for name, fields_ in sections.items()},
    )
    validate(config)
    return config


def _scale_warmup(values: dict[str, Any], default_steps: int) -> None:
    """Warmup not given (nor saved with a run): a tenth of the run, so that a short run decays too."""
    steps = values.get("train.steps", default_steps)
    if "train.warmup" not in values and isinstance(steps, int) and not isinstance(steps, bool):
        values["train.warmup"] = steps // 10


def validate(config: Config) -> None:
    m, t = config.model, config.train
    for key, value in (
        ("model.block_size", m.block_size),
        ("model.n_layer", m.n_layer),
        ("model.n_head", m.n_head),
        ("train.steps", t.steps),
        ("train.global_batch", t.global_batch),
        ("train.micro_batch", t.micro_batch),
        ("train.keep", t.keep),
        ("train.log_every", t.log_every),
        ("train.eval_steps", t.eval_steps),
        ("parallel.tp", config.parallel.tp),
        ("parallel.pp", config.parallel.pp),
        ("parallel.cp", config.parallel.cp),
    ):
        if value < 1:
            raise UsageError(f"{key} must be at least 1, not {value}")
    registry.family_of(m).check(m, 1)
    for key, value in (
        ("train.eval_every", t.eval_every),
        ("train.ckpt_every", t.ckpt_every),
        ("train.warmup", t.warmup),
        ("train.weight_decay", t.weight_decay),
        ("train.grad_clip", t.grad_clip),
        ("train.min_lr", t.min_lr),
        ("train.watchdog_s", t.watchdog_s),
        ("train.check_replicas_every", t.check_replicas_every),
        ("train.mmap_mb", t.mmap_mb),
        ("train.loss_chunk", t.loss_chunk),
        ("horovod.fusion_threshold_mb", config.horovod.fusion_threshold_mb),
        ("parallel.reduce_every", config.parallel.reduce_every),
    ):
        if value < 0:
            raise UsageError(f"{key} must be 0 or more, not {value} (0 turns it off)")
    if config.parallel.bucket_mb <= 0:
        raise UsageError(f"parallel.bucket_mb must be positive, not {config.parallel.bucket_mb}")
    if (cycle_ms := config.horovod.cycle_time_ms) < 0:
        raise UsageError(f"horovod.cycle_time_ms must be 0 (auto) or more, not {cycle_ms}")
    if t.lr <= 0:
        raise UsageError(f"train.lr must be positive, not {t.lr}")
    if not 0 <= m.dropout < 1:
        raise UsageError(f"model.dropout must be in [0, 1), not {m.dropout}")
    for key, value, choices in (
        ("train.dtype", t.dtype, ("float32", "bfloat16")),
        ("train.recompute", t.recompute, RECOMPUTE),
        ("train.async_checkpoint", t.async_checkpoint, ("auto", "true", "false")),
        ("parallel.tp_backend", config.parallel.tp_backend, TP_BACKENDS),
        ("horovod.controller", config.horovod.controller, HOROVOD_CONTROLLERS),
        ("parallel.pp_backend", config.parallel.pp_backend, PP_BACKENDS),
        ("parallel.cp_backend", config.parallel.cp_backend, PP_BACKENDS),
        ("parallel.schedule", config.parallel.schedule, ("1f1b", "gpipe")),
        ("parallel.zero", config.parallel.zero, ZERO),
        ("parallel.shard_group", config.parallel.shard_group, ("world", "node")),
        ("parallel.grad_compression", config.parallel.grad_compression, ("none", "fp16")),
    ):
        if value not in choices:
            listed = f"{', '.join(map(str, choices[:-1]))} or {choices[-1]}"
            raise UsageError(f"{key} must be {listed}, not {value}")
