"""Node-local staging: copy a prepared dataset once per node before training reads it.

Parallel file systems serve large sequential reads well and millions of small random reads (a
sampler's memmap access pattern) badly; HPC sites ask jobs to copy their data to node-local disk
first. With `data.stage_dir`, one rank per node (the node communicator's rank 0) copies the token
files, tokenizer and manifest into that directory, the node's other ranks wait, and every rank then
reads its node's copy. `{node}` in the path becomes the node index and environment variables are
expanded (`$TMPDIR`, `$SLURM_JOB_ID`, ...). A copy whose manifest and file sizes already match is
reused (a requeued job does not copy again); files are copied under a temporary name and renamed,
so an interrupted copy is never taken for a complete one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from hpcllm.cluster.runtime import every_rank_checks
from hpcllm.data.tokens import MANIFEST, Prepared
from hpcllm.errors import UsageError


def stage_path(template: str, node: int) -> Path:
    return Path(os.path.expandvars(template.replace("{node}", str(node))))


def _already_staged(source: Prepared, target: Path) -> bool:
    manifest = target / MANIFEST
    if not manifest.is_file() or manifest.read_text() != (source.path / MANIFEST).read_text():
        return False
    names = source.files()
    return all(
        (target / name).is_file() and (target / name).stat().st_size == (source.path / name).stat().st_size
        for name in names
    )


def _copy(source: Prepared, target: Path) -> bool:
    """Copy the dataset into `target` unless it is there already; True when it copied."""
    if _already_staged(source, target):
        return False
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name in [*source.files(), MANIFEST]:  # the manifest last: its presence marks a complete copy
            partial = target / f".{name}.partial"
            shutil.copyfile(source.path / name, partial)
            partial.replace(target / name)
    except OSError as exc:
        raise UsageError(
            f"data.stage_dir: cannot copy the data to {target} ({exc}); choose another path"
        ) from exc
    return True


def stage(source: Prepared, template: str, node_comm: Any, world: Any, node: int) -> tuple[Prepared, bool]:
    """Collective: this node's copy of `source` (made by the node's first rank) and whether this
    call copied. Every rank of the world ends with the same error if any node's copy fails."""
    target = stage_path(template, node)
    leader = node_comm.Get_rank() == 0
    copied = every_rank_checks(world, lambda: _copy(source, target) if leader else False)
    node_comm.Barrier()  # the node's copy is complete before any of its ranks reads it
    return Prepared(target, source.manifest), copied
