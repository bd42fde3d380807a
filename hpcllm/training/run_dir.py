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
from hpcllm.data.stage import stage
from hpcllm.data.tokens import Prepared, open_prepared, split_digest
from hpcllm.errors import UsageError
from hpcllm.training import checkpoint
from hpcllm.training.plan import Plan

log = logging.getLogger("hpcllm.training")


def default_run_dir() -> Path:
    job = os.environ.get("SLURM_JOB_ID")
    return Path("runs") / (f"job-{job}" if job else time.strftime("%Y%m%d-%H%M%S"))


def open_run_dir(out_arg: str | None, resume: bool) -> tuple[Path, dict[str, Any] | None]:
    """(run directory, saved config when resuming). Refuses to touch a run without --resume."""
    out = Path(out_arg) if out_arg else default_run_dir()
    saved_config = out / "config.yaml"
    if resume:
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


def ensure_data(plan: Plan, rt: runtime.Runtime, node_comm: Any) -> Prepared:
    """The prepared data of data.path; the default corpus is prepared there on first use. Start-up
    reads the manifest and checks the files' sizes: O(1) in the data's size (the checksums are
    computed by `hpcllm prepare`, and re-checked by `open_prepared(verify=True)`)."""
    path = Path(plan.config.data.path)
    if plan.default_data and not (path / "manifest.json").exists():
        log.info("preparing the default corpus (Python's standard library) once, into %s", path)
        options = prepare.PrepareOptions(sources=[], out=path, force=True)
        prepare.set_tokenizer_threads(rt.threads)
        summary = prepare.prepare(options, rt.comm)
        for line in summary.lines():
            log.info("  %s", line)
    root_verified = runtime.root_decides(rt.comm, lambda: open_prepared(path, verify=False).manifest)
    data = Prepared(path, root_verified)
    if not plan.config.data.stage_dir:
        return data
    staged, copied = stage(data, plan.config.data.stage_dir, node_comm, rt.comm, rt.node_index)
    if copied:
        log.info("staged the data for node %d into %s", rt.node_index, staged.path)
    return staged


def resume_point(out: Path, data: Prepared) -> tuple[int, int]:
    """(step, samples consumed) that a resume of the run in `out` continues from. The data order is
    a function of (seed, sample): other data would repeat and skip samples, so it is refused (the
    seed is checked with the plan); another global batch is fine."""
    ckpt = checkpoint.latest(out)
    assert ckpt is not None  # checked when the run directory was opened
    manifest = checkpoint.read_manifest(ckpt)
    sampler, step = manifest.get("sampler", {}), manifest["step"]
    trained_on = sampler.get("data_sha256")
    if trained_on and trained_on != split_digest(data.manifest, "train"):
        raise UsageError(
            f"--resume: {data.path} is not the data this run was trained on (its train split differs); "
            "resume on the same prepared data, or start a new run"
        )
    return step, sampler.get("consumed_samples", step * manifest["config"]["train"]["global_batch"])
