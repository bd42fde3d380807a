"""Reading a checkpoint's files, each checked against the manifest's SHA-256 first, and the DP
ranks' part files of a sharded state: joined whole (any layout), or, fully sharded at the same tp
and pp, read share by share (`load_own_shares`: safetensors reads a slice of a stored tensor without
the rest, so no whole partition comes onto a rank)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from hpcllm.errors import UsageError
from hpcllm.parallel.fully_sharded import FullyShardedUnits
from hpcllm.training import optimizer_state, shard_io
from hpcllm.training.snapshot import part_name


def verified(checkpoint: Path, name: str, manifest: dict[str, Any]) -> Path:
    """The path of file `name` of the checkpoint, once its SHA-256 matches the manifest's (read in
    chunks: a shard is never held whole for the check)."""
    path = checkpoint / name
    if name not in manifest["shards"]:
        raise UsageError(f"{checkpoint} has no shard {name} (saved with layout {manifest['layout']})")
    if not path.exists():
        raise UsageError(f"checkpoint shard {path} is missing")
    if shard_io.sha256_of(path) != manifest["shards"][name]:
        raise UsageError(f"checkpoint shard {path} does not match its checksum: the file is damaged")
    return path


def side_file(checkpoint: Path, base: str, manifest: dict[str, Any]) -> dict[str, Any]:
    return json.loads(verified(checkpoint, f"{base}.json", manifest).read_bytes())


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:  # a manifest can be rewritten along with the shard: the format is checked too
        return shard_io.read(path)
    except SafetensorError as exc:
        raise UsageError(f"checkpoint shard {path} is not a safetensors file ({exc}); refusing it") from exc


def param_name(key: str) -> str:
    """The model parameter a stored tensor belongs to: model.NAME or optim.NAME.STATE."""
    if key.startswith("model."):
        return key[len("model.") :]
    if key.startswith("optim."):
        return key[len("optim.") :].rsplit(".", 1)[0]
    return ""  # rng state and the like: replicated


def joined_parts(
    checkpoint: Path,
    manifest: dict[str, Any],
    partition: tuple[int, int],
    dp: int,
    model: dict[str, torch.Tensor],
    optimizer: bool,
) -> dict[str, torch.Tensor]:
    """One partition's tensors that the DP ranks wrote in shares, joined whole: a sharded
    optimizer's state as AdamW's per-parameter tensors (with `optimizer`) and, fully sharded, the
    parameters (`model.NAME`). Each is shaped as the partition's parameter."""
    joined: dict[str, torch.Tensor] = {}
    for dp_rank in range(dp):
        base = part_name(*partition, dp_rank)
        parts = read_safetensors(verified(checkpoint, f"{base}.safetensors", manifest))
        meta = side_file(checkpoint, base, manifest)
        shapes = meta.get("shapes", {})
        for key, piece in parts.items():
            name = param_name(key)
            if key.startswith("optim.") and not optimizer:
                continue
            first, end = meta["parts"][name]
            shape = shapes[name] if name in shapes else model[f"model.{name}"].shape
            joined.setdefault(key, torch.zeros(shape)).view(-1)[first:end] = piece
            if key.startswith("optim."):
                joined[f"optim.{name}.step"] = torch.tensor(float(meta["step"]))
    return joined


@torch.no_grad()
def load_own_shares(
    model: torch.nn.Module,
    units: FullyShardedUnits,
    optimizer: Any,
    checkpoint: Path,
    manifest: dict[str, Any],
    partition: tuple[int, int],
    meta: dict[str, Any],
) -> None:
    """This rank's shares of the parameters (and, with `optimizer`, of the Adam moments and its
    step and settings) from the part files of `partition` (pp, tp); `meta`: the partition's side
    file."""
    names = {id(param): name for name, param in model.named_parameters()}
    owned = [(names[id(param)], at, a, b) for param, at, a, b in units.owned]
    moments = (("exp_avg", optimizer.exp_avg), ("exp_avg_sq", optimizer.exp_avg_sq)) if optimizer else ()
    step = 0
    for index in range(meta["optimizer_parts"]):
        base = part_name(*partition, index)
        ranges = side_file(checkpoint, base, manifest)
        path = verified(checkpoint, f"{base}.safetensors", manifest)
        with safe_open(str(path), framework="pt") as stored:
            keys = set(stored.keys())
            for name, at, lo, hi in owned:
                first, end = ranges["parts"].get(name, (0, 0))
                start, stop = max(lo, first), min(hi, end)
                if start >= stop:
                    continue
                into, source = slice(at + start - lo, at + stop - lo), slice(start - first, stop - first)
                units.param_shard[into] = stored.get_slice(f"model.{name}")[source]
                for key, moment in moments:
                    if f"optim.{name}.{key}" in keys:
                        moment[into] = stored.get_slice(f"optim.{name}.{key}")[source]
        step = int(ranges["step"])
    if optimizer is not None:
        optimizer_state.from_tensors(optimizer, {}, meta["optimizer_groups"], dict(model.named_parameters()))
        optimizer.steps = step
    units.release_all()  # whole copies gathered before hold the old values
