"""Sharded, atomic, checksummed checkpoints.

Layout of a run's `checkpoints/`:

    step-00000200/
        manifest.json                 step, config, layout, sampler position, sha256 of every shard
        shard-pp0-tp0.safetensors     model + optimizer tensors + RNG state of one model partition
        shard-pp0-tp0.json            what is not a tensor: optimizer hyperparameters, tensor names
        shard-pp0-tp0-dp1.safetensors with a sharded optimizer (parallel.zero): DP rank 1's shares
        shard-pp0-tp0-dp1.json          of the Adam state (fully sharded: and of the parameters), and
                                        which elements of each parameter they are
    latest                            the name of the newest complete checkpoint

One DP replica (dp rank 0) of each (pp, tp) partition writes its shard; replicas are identical.
A sharded optimizer's state is written by every DP rank, its own shares (training.snapshot).
A checkpoint is written under a hidden temporary name and renamed when every shard and the
manifest are on disk, then `latest` is replaced by rename: a crash at any point leaves `latest`
naming the previous complete checkpoint. Loading checks every shard against its checksum and
reads tensors only through safetensors and JSON: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from hpcllm.cluster.runtime import root_decides
from hpcllm.errors import UsageError
from hpcllm.parallel.fully_sharded import units_of
from hpcllm.parallel.grid import Grid
from hpcllm.parallel.sharding import REPLICATED, Sharding, model_sharding, shard, unshard
from hpcllm.training import optimizer_state, shard_io
from hpcllm.training.checkpoint_files import (
    joined_parts,
    load_own_shares,
    param_name,
    read_safetensors,
    side_file,
    verified,
)
from hpcllm.training.snapshot import ShardSnapshot, shard_name, take_snapshot

FORMAT_VERSION = 1
LATEST = "latest"
MANIFEST = "manifest.json"
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib"}


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


# ---- save ---------------------------------------------------------------------------------


def write_snapshot(staging: Path, snapshots: list[ShardSnapshot]) -> dict[str, str]:
    """Each snapshot's shard and side file, written durably; their SHA-256 by file name. No
    communication, so it may run in a background thread."""
    written = {}
    for snapshot in snapshots:
        base = snapshot.base
        written[f"{base}.safetensors"] = shard_io.write(staging / f"{base}.safetensors", snapshot.tensors)
        written[f"{base}.json"] = _write_durably(staging / f"{base}.json", json.dumps(snapshot.meta).encode())
    return written


def begin(run_dir: Path, step: int, grid: Grid) -> Path:
    """Collective: the hidden staging directory of the checkpoint of `step`."""
    root = run_dir / "checkpoints"

    def make_staging() -> str:
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".tmp-{step_name(step)}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        return str(staging)

    return Path(root_decides(grid.world, make_staging))


def publish(
    staging: Path, step: int, grid: Grid, written: dict[str, str], manifest_extra: dict[str, Any], keep: int
) -> Path:
    """Collective: once every rank's files are on disk, rank 0 writes the manifest, renames the
    staging directory to its final name, points `latest` at it and prunes old checkpoints."""
    gathered = grid.world.gather(written, root=0)
    root = staging.parent
    final = root / step_name(step)

    def complete() -> str:
        shards = {name: digest for part in gathered for name, digest in part.items()}
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "layout": asdict(grid.layout),
            "shards": shards,
            **manifest_extra,
        }
        _write_durably(staging / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync(staging)
        if final.exists():  # the same step saved again (a resumed run re-reaching it): replace
            shutil.rmtree(final)
        staging.rename(final)
        _point_latest(root, final.name)
        _prune(root, keep)
        return str(final)

    return Path(root_decides(grid.world, complete))


def save(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    grid: Grid,
    manifest_extra: dict[str, Any],
    keep: int,
    after_shard: Callable[[], None] | None = None,
) -> Path:
    """Collective: every rank of the grid calls it; the checkpoint is complete when it returns.
    `after_shard` runs between this rank's shard write and the checkpoint's completion."""
    staging = begin(run_dir, step, grid)
    written = write_snapshot(staging, take_snapshot(model, optimizer, grid, copy=False))
    if after_shard is not None:
        after_shard()
    return publish(staging, step, grid, written, manifest_extra, keep)


def replace_durably(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file, fsynced, renamed over it, the folder
    fsynced. A kill at any moment leaves the old content or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_durably(tmp, data)
    tmp.replace(path)
    _fsync(path.parent)


def _point_latest(root: Path, name: str) -> None:
    replace_durably(root / LATEST, (name + "\n").encode())


def discard_partial(run_dir: Path) -> list[str]:
    """Delete the staging directories of checkpoint writes that never completed (a killed job)."""
    root = run_dir / "checkpoints"
    partial = sorted(root.glob(".tmp-step-*")) if root.is_dir() else []
    for path in partial:
        shutil.rmtree(path)
    return [str(p) for p in partial]


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step-*") if (p / MANIFEST).exists())
    for old in complete[:-keep]:
        shutil.rmtree(old)


# ---- load ---------------------------------------------------------------------------------


def latest(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    target = run_dir / "checkpoints" / pointer.read_text().strip()
    return target if (target / MANIFEST).exists() else None


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"{checkpoint / MANIFEST} cannot be read ({exc}); the checkpoint is damaged"
        ) from exc


def _read_shard(
    checkpoint: Path, manifest: dict[str, Any], pp_rank: int, tp_rank: int, optimizer: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One partition's tensors and side file; with `optimizer`, its sharded optimizer's state
    joined from the DP ranks' part files (not read when only the weights are wanted)."""
    base = shard_name(pp_rank, tp_rank)
    path = verified(checkpoint, f"{base}.safetensors", manifest)
    tensors = read_safetensors(path)
    meta = side_file(checkpoint, base, manifest)
    if meta.get("optimizer_parts") and (optimizer or meta.get("parameter_parts")):
        tensors.update(
            joined_parts(
                checkpoint, manifest, (pp_rank, tp_rank), meta["optimizer_parts"], tensors, optimizer
            )
        )
    return tensors, meta


def refuse_pickles(checkpoint: Path) -> None:
    """A pickle runs code when it is loaded: hpcllm never opens one, and will not load a checkpoint
    that carries one, since someone expected it to be loaded."""
    for path in sorted(checkpoint.iterdir()):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UsageError(
                f"{path} is a pickle-format file; hpcllm loads tensors only from the safetensors shards "
                "listed in manifest.json and does not open it. Remove it (or the checkpoint) to go on"
            )


def _resharded(
    checkpoint: Path, manifest: dict[str, Any], grid: Grid, model: torch.nn.Module, optimizer: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's tensors from a checkpoint saved with another (pp, tp). Each saved stage's JSON
    side file names its parameters and how they were split; only the stages holding a parameter
    this rank still needs are read. Each tensor is taken from the first stage that saved it, its TP
    slices joined by the saved split and cut by the split this model's layers declare."""
    saved = manifest["layout"]
    current = model_sharding(model)
    tensors: dict[str, torch.Tensor] = {}
    loaded: set[str] = set()
    first_meta: dict[str, Any] = {}
    for stage in range(saved["pp"]):
        stage_meta = side_file(checkpoint, shard_name(stage, 0), manifest)
        first_meta = first_meta or stage_meta  # optimizer hyperparameters: the same on every stage
        names = {name for group in stage_meta["optimizer_groups"] for name in group["params"]}
        if not (names & current.keys()) - loaded:
            continue
        if saved["tp"] > 1 and "sharding" not in stage_meta:
            raise UsageError(f"{checkpoint} predates recorded sharding; resume it at tp = {saved['tp']}")
        saved_split = {n: Sharding.from_json(s) for n, s in stage_meta.get("sharding", {}).items()}
        shards = [_read_shard(checkpoint, manifest, stage, t, optimizer)[0] for t in range(saved["tp"])]
        for key in shards[0]:
            name = param_name(key)
            if key in tensors or (name and name not in current):
                continue
            full = unshard([shard[key] for shard in shards], saved_split.get(name, REPLICATED))
            tensors[key] = shard(full, current.get(name, REPLICATED), grid.tp_rank, grid.layout.tp)
        loaded |= names
    return tensors, first_meta


def load_whole_model(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    grid: Grid,
    source: str,
    names: set[str] | None = None,
) -> None:
    """Load the whole model's tensors (single-process names) into this rank's part: its stage's
    tensors, each cut by this rank's tensor-parallel split; `names`: only those (fully sharded
    parameters, loaded unit by unit)."""
    current = model_sharding(model)
    state = {}
    for name in names if names is not None else model.state_dict():
        if name not in tensors:
            raise UsageError(f"{source} lacks {name}")
        state[name] = shard(tensors[name], current.get(name, REPLICATED), grid.tp_rank, grid.layout.tp)
    _load_model_state(source, model, state, partial=names is not None)


def _load_model_state(
    source: Any, model: torch.nn.Module, state: dict[str, torch.Tensor], partial: bool = False
) -> None:
    """The model's tensors into this rank's model; fully sharded, the parameters into its shares.
    `partial`: some of them only."""
    expected = model.state_dict().keys()
    missing, unexpected = set() if partial else expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise UsageError(
            f"{source} does not fit this model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    units = units_of(model)
    if units is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        units.load_parameters(state, names)
        state = {k: v for k, v in state.items() if k not in set(names.values())}
    model.load_state_dict(state, strict=False)


def load(
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    grid: Grid,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load this rank's partition (and optimizer state); a checkpoint of another layout is resharded.
    `restore_rng`: also the random generators' state (a resumed run; not a new run started from it)."""
    refuse_pickles(checkpoint)
    manifest = read_manifest(checkpoint)
    saved, partition, units = manifest["layout"], (grid.pp_rank, grid.tp_rank), units_of(model)
    same = (saved["pp"], saved["tp"]) == (grid.layout.pp, grid.layout.tp)
    # Only a fully sharded model can read its shares alone: nobody else needs the side file here.
    meta = side_file(checkpoint, shard_name(*partition), manifest) if same and units is not None else {}
    if units is not None and meta.get("parameter_parts"):  # fully sharded both: this rank's shares only
        load_own_shares(model, units, optimizer, checkpoint, manifest, partition, meta)
        tensors = read_safetensors(verified(checkpoint, f"{shard_name(*partition)}.safetensors", manifest))
    else:
        if same:
            tensors, meta = _read_shard(checkpoint, manifest, *partition, optimizer is not None)
        else:
            tensors, meta = _resharded(checkpoint, manifest, grid, model, optimizer is not None)
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        _load_model_state(checkpoint, model, model_state)
        if optimizer is not None:
            params = dict(model.named_parameters())
            optimizer_state.from_tensors(optimizer, tensors, meta["optimizer_groups"], params)
    if restore_rng and "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if restore_rng and "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return manifest


def run_checkpoint(run: Path, name: str | None, given_as: str = "--run ") -> Path:
    """The run's checkpoint called `name` (under RUN/checkpoints), else its latest complete one;
    `given_as`: how the errors name the run (the flag or key that gave it)."""
    if not (run / "config.yaml").is_file():
        raise UsageError(f"{given_as}{run} is not an hpcllm run directory (config.yaml missing)")
    ckpt = run / "checkpoints" / name if name else latest(run)
    if ckpt is None or not (ckpt / MANIFEST).is_file():
        which = f"checkpoint {name}" if name else "complete checkpoint"
        raise UsageError(f"{given_as}{run} has no {which}; train it first (or name one under checkpoints/)")
    refuse_pickles(ckpt)
    return ckpt
