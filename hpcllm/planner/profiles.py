"""Cluster profiles: what the step model needs to know about a machine, as YAML files.

Shipped: `a100` (DGX A100 80GB, as in NVIDIA's Selene runs) and `h100` (H100 SXM nodes), each figure
with its source in a comment. `local` is this machine, written by `hpcllm plan calibrate` into the
user's profile directory (`$XDG_CONFIG_HOME/hpcllm/profiles`, else ~/.config/hpcllm/profiles), which
is also searched for any other name. `--cluster FILE` takes a user's own file with the same fields.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from hpcllm.errors import UsageError

SHIPPED = Path(__file__).parent / "profiles"
LOCAL = "local"


def user_dir() -> Path:
    """Where calibrated profiles go: per user and machine-independent of the checkout."""
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "hpcllm" / "profiles"


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    gpus_per_node: int
    memory_gib: float  # per GPU
    peak_flops: float  # dense bf16 peak per GPU (the MFU denominator)
    gemm_efficiency: float  # sustained share of peak at large hidden sizes
    gemm_half_size: float  # hidden size at which the sustained share is half of gemm_efficiency
    intra_node_gbps: float  # GB/s per GPU per direction inside a node
    inter_node_gbps: float  # GB/s per GPU per direction between nodes
    intra_node_latency_us: float
    inter_node_latency_us: float
    collective_efficiency: float  # achieved / link bandwidth for large collectives
    dp_overlap: float  # share of the data-parallel reduction hidden behind backward
    # Optional; the defaults describe GPUs, whose profiles need not name them.
    cores_per_node: int = 0  # 0: a rank owns its GPU; n: the node's ranks share n CPU cores
    layer_overhead_us: float = 0.0  # fixed time per layer and micro-batch, forward + backward (op dispatch)
    head_efficiency: float = 1.0  # the vocabulary projection and loss, as a share of large_gemm_flops
    micro_batch_overhead_us: float = 0.0  # fixed time per micro-batch outside the layers (embedding, loss)
    tp_collective_us: float = 0.0  # extra cost of a tensor-parallel collective beyond the ring model
    pp_micro_batch_us: float = 0.0  # extra cost of a micro-batch through a pipeline stage
    oversubscribed_efficiency: float = 1.0  # CPU: rate kept per doubling of ranks over the cores
    bubble_fill: float = 0.0  # CPU, ranks over cores: share of a pipeline bubble the other ranks use
    step_scale: float = 1.0  # measured / predicted step of a real training run (the loop, data, hooks)
    thread_efficiency: float = 1.0  # CPU: one rank's rate on all cores / the cores' rate as one rank each
    memory_gbps: float = 0.0  # device memory bandwidth for the optimizer step (0: not modelled)
    activation_bytes: int = 2  # bytes per activation element: 2 (bf16 on GPUs), 4 (fp32 on CPU)
    calibration_model: str = ""  # the shape `plan calibrate` ran its training runs with, n_layer=..,...
    # GPUs: a micro-batch of few tokens gives GEMMs too small to fill the GPU; the sustained rate is
    # scaled by tokens / (tokens + gemm_half_tokens), tokens = micro_batch x sequence. 0: no effect.
    gemm_half_tokens: float = 0.0

    @property
    def large_gemm_flops(self) -> float:
        """FLOP/s of large GEMMs (such as the vocabulary projection): one GPU's, or a CPU node's
        with one single-threaded rank per core."""
        return self.peak_flops * self.gemm_efficiency

    def sustained_flops(self, hidden: int, tokens: int | None = None) -> float:
        """FLOP/s a transformer layer's kernels sustain at this hidden size and, on GPUs, this many
        tokens per micro-batch (larger GEMMs get closer to the peak)."""
        rate = self.large_gemm_flops * hidden / (hidden + self.gemm_half_size)
        if tokens is not None and self.gemm_half_tokens:
            rate *= tokens / (tokens + self.gemm_half_tokens)
        return rate


def shipped() -> list[str]:
    return sorted(path.stem for path in SHIPPED.glob("*.yaml"))


def _find(name_or_file: str) -> Path:
    path = Path(name_or_file)
    if path.is_file():
        return path
    for directory in (user_dir(), SHIPPED):
        if (directory / f"{name_or_file}.yaml").is_file():
            return directory / f"{name_or_file}.yaml"
    if name_or_file == LOCAL:
        raise UsageError(
            "the local cluster profile: this machine is not calibrated yet; run `hpcllm plan calibrate` "
            f"(it writes {user_dir() / 'local.yaml'})"
        )
    raise UsageError(
        f"--cluster {name_or_file}: no such file or profile; choose {', '.join(shipped())}, local "
        "(after `hpcllm plan calibrate`) or give a YAML file"
    )


def load(name_or_file: str) -> ClusterProfile:
    """A profile by name (the user's calibrated ones, then the shipped ones) or a YAML file; an
    unknown or missing field is one UsageError."""
    path = _find(name_or_file)
    try:
        data: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"cluster profile {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"cluster profile {path} must be a mapping of field: value")
    names = [f.name for f in fields(ClusterProfile)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UsageError(
            f"cluster profile {path}: unknown field {unknown[0]!r}; fields are {', '.join(names)}"
        )
    missing = [f.name for f in fields(ClusterProfile) if f.default is MISSING and f.name not in data]
    if missing:
        raise UsageError(f"cluster profile {path}: missing field {missing[0]!r}")
    kinds = {f.name: {"str": str, "int": int}.get(str(f.type), float) for f in fields(ClusterProfile)}
    try:
        values = {name: kinds[name](value) for name, value in data.items()}
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cluster profile {path}: {exc}") from exc
    return ClusterProfile(**values)
