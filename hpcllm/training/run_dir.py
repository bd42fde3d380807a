"""The run directory (config.yaml, metrics.jsonl, loss.png, logs/, checkpoints/) and the data a run
reads: where a run writes, when an existing directory may be touched, and the default corpus."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from hpcllm.cluster import runtime
from hpcllm.data import prepare
from hpcllm.data.mixture import Mixture, check_shared_tokenizer, components_of
from hpcllm.data.stage import stage
from hpcllm.data.tokens import Prepared, open_prepared
from hpcllm.errors import UsageError
from hpcllm.training import checkpoint
from hpcllm.training.plan import Plan

log = logging.getLogger("hpcllm.training")


def default_run_dir() -> Path:
    job = os.environ.get("SLURM_JOB_ID")
    return Path("runs") / (f"job-{job}" if job else time.strftime("%Y%m%d-%H%M%S"))


def open_run_dir(out_arg: str | None, resume: bool) -> tuple[Path, dict[str, Any] | None]:
    """(run directory, saved config when resuming). Refuses to touch a run without --resume. A run
    that stopped before its first complete checkpoint is resumed from step 0 with its saved
    configuration (`has_checkpoint` tells the two apart), so a job that died in its first minutes
    is restarted like any other."""
    out = Path(out_arg) if out_arg else default_run_dir()
    saved_config = out / "config.yaml"
    if resume:
        if not saved_config.is_file():
            raise UsageError(
                f"--resume: {out} holds no run (config.yaml missing); drop --resume to start one"
            )
        ckpt = checkpoint.latest(out)
        if ckpt is None:
            log.warning(
                "--resume: %s has no complete checkpoint yet; starting it again from step 0 with its saved "
                "configuration",
                out,
            )
        else:
            checkpoint.refuse_pickles(ckpt)
        return out, yaml.safe_load(saved_config.read_text())
    if saved_config.exists():
        raise UsageError(
            f"--out {out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty and is not an hpcllm run; choose another directory")
    return out, None


def has_checkpoint(out: Path) -> bool:
    """Whether a resume of the run in `out` continues from a checkpoint (else it starts at step 0)."""
    return checkpoint.latest(out) is not None


def ensure_data(plan: Plan, rt: runtime.Runtime, node_comm: Any) -> Mixture:
    """The prepared data of data.path, or of every dataset of data.mix (which must share a
    tokenizer); the default corpus is prepared on first use. Start-up reads the manifests and
    checks the files' sizes: O(1) in the data's size (the checksums are computed by `hpcllm
    prepare`, and re-checked by `open_prepared(verify=True)`)."""
    data = plan.config.data
    components = components_of(data.path, data.mix)
    if plan.default_data:
        _prepare_default_corpus(Path(data.path), rt)
    datasets = []
    for index, component in enumerate(components):
        # A mixture's datasets are staged side by side, each in its own subdirectory.
        where = data.stage_dir if len(components) == 1 or not data.stage_dir else f"{data.stage_dir}/{index}"
        datasets.append(_open_dataset(Path(component.path), where, rt, node_comm))
    if len(datasets) > 1:
        runtime.root_decides(rt.comm, lambda: check_shared_tokenizer(datasets))
    return Mixture(datasets, [c.weight for c in components], data.packing, data.document_mask)


def _prepare_default_corpus(path: Path, rt: runtime.Runtime) -> None:
    if not (path / "manifest.json").exists():
        log.info("preparing the default corpus (Python's standard library) once, into %s", path)
        options = prepare.PrepareOptions(sources=[], out=path, force=True)
        prepare.set_tokenizer_threads(rt.threads)
        summary = prepare.prepare(options, rt.comm)
        for line in summary.lines():
            log.info("  %s", line)


def _open_dataset(path: Path, stage_dir: str, rt: runtime.Runtime, node_comm: Any) -> Prepared:
    """One prepared directory, checked by rank 0, and copied to node-local disk with data.stage_dir."""
    root_verified = runtime.root_decides(rt.comm, lambda: open_prepared(path, verify=False).manifest)
    data = Prepared(path, root_verified)
    if not stage_dir:
        return data
    staged, copied = stage(data, stage_dir, node_comm, rt.comm, rt.node_index)
    if copied:
        log.info("staged the data for node %d into %s", rt.node_index, staged.path)
    return staged


def resume_point(out: Path, data: Mixture) -> tuple[int, int]:
    """(step, samples consumed) that a resume of the run in `out` continues from. The data order is
    a function of (seed, sample): other data would repeat and skip samples, so it is refused (the
    seed is checked with the plan); another global batch is fine."""
    ckpt = checkpoint.latest(out)
    assert ckpt is not None  # checked when the run directory was opened
    manifest = checkpoint.read_manifest(ckpt)
    sampler, step = manifest.get("sampler", {}), manifest["step"]
    trained_on = sampler.get("data_sha256")
    if trained_on and trained_on != data.identity():
        names = ", ".join(str(d.path) for d in data.datasets)
        raise UsageError(
            f"--resume: {names} is not the data this run was trained on (a train split or a weight "
            "differs); resume on the same prepared data, or start a new run"
        )
    return step, sampler.get("consumed_samples", step * manifest["config"]["train"]["global_batch"])
