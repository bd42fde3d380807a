"""Cluster profiles: what the step model needs to know about a machine, as YAML files.

Shipped: `a100` (DGX A100 80GB, as in NVIDIA's Selene runs) and `h100` (H100 SXM nodes), each figure
with its source in a comment. `--cluster FILE` takes a user's own file with the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from hpcllm.errors import UsageError

SHIPPED = Path(__file__).parent / "profiles"


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

    def sustained_flops(self, hidden: int) -> float:
        """FLOP/s a transformer layer's kernels sustain at this hidden size (larger GEMMs get closer
        to the peak)."""
        return self.peak_flops * self.gemm_efficiency * hidden / (hidden + self.gemm_half_size)


def shipped() -> list[str]:
    return sorted(path.stem for path in SHIPPED.glob("*.yaml"))


def load(name_or_file: str) -> ClusterProfile:
    """A shipped profile by name, or a YAML file; an unknown or missing field is one UsageError."""
    path = Path(name_or_file)
    if not path.is_file():
        path = SHIPPED / f"{name_or_file}.yaml"
        if not path.is_file():
            raise UsageError(
                f"--cluster {name_or_file}: no such file or shipped profile; choose {', '.join(shipped())} "
                "or give a YAML file"
            )
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
    missing = [name for name in names if name not in data]
    if missing:
        raise UsageError(f"cluster profile {path}: missing field {missing[0]!r}")
    try:
        values = {f.name: (str if f.name == "name" else float)(data[f.name]) for f in fields(ClusterProfile)}
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cluster profile {path}: {exc}") from exc
    values["gpus_per_node"] = int(values["gpus_per_node"])
    return ClusterProfile(**values)
