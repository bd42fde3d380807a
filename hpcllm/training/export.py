"""`hpcllm export`: a run's checkpoint as a folder other tools load.

`--format hf` writes a Hugging Face folder through the model family's adapter (config.json,
model.safetensors, the run's tokenizer as tokenizer.json with its tokenizer_config.json) that
transformers (`GPT2LMHeadModel.from_pretrained` for GPT-2) and `AutoTokenizer.from_pretrained`
read. A checkpoint of any tp/pp is joined into the whole model first. The folder is written
beside its destination and renamed into place: an interrupted export leaves nothing
half-written, and an existing folder is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from hpcllm.cluster import runtime
from hpcllm.data import tokenizer as tok
from hpcllm.errors import UsageError
from hpcllm.model import hf_folder
from hpcllm.model.gpt import GPT
from hpcllm.model.registry import family_of_shape
from hpcllm.training import checkpoint
from hpcllm.training.checkpoint import run_checkpoint
from hpcllm.training.generate import load_model

FORMATS = ("hf",)


@dataclass
class ExportArgs:
    run: str
    out: str
    step: int | None = None
    format: str = "hf"


def _check(args: ExportArgs) -> tuple[Path, Path]:
    if args.format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {args.format!r}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not an empty folder; choose a new path")
    existing = next(parent for parent in out.absolute().parents if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):  # missing folders are created
        raise UsageError(f"--out {out}: {existing} is not a writable folder")
    name = checkpoint.step_name(args.step) if args.step is not None else None
    return run_checkpoint(Path(args.run), name), out


def write_hf_folder(model: GPT, tokenizer: Any, out: Path) -> None:
    """The whole (one-process) `model` and its tokenizer as a Hugging Face folder at `out` (new, or
    empty), through its family's adapter: written beside it, then renamed into place."""
    shape = model.shape
    adapter = family_of_shape(shape).hf()
    out.parent.mkdir(parents=True, exist_ok=True)  # as train and prepare create theirs
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        boundaries = tok.document_tokens(tokenizer)
        folder = adapter.config_json(shape, boundaries)
        (staging / hf_folder.CONFIG).write_text(json.dumps(folder, indent=2) + "\n")
        weights = adapter.to_hf(model.state_dict(), shape)
        save_file(weights, staging / hf_folder.WEIGHTS, {"format": "pt"})
        tokenizer.save(str(staging / hf_folder.TOKENIZER_FILE))
        settings = hf_folder.tokenizer_config(shape.block_size, tokenizer, boundaries)
        (staging / hf_folder.TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked by the caller
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export(args: ExportArgs) -> int:
    ckpt, out = _check(args)
    model, tokenizer, _, _ = load_model(Path(args.run), ckpt, runtime.init())
    write_hf_folder(model, tokenizer, out)
    shape = model.shape
    adapter = family_of_shape(shape).hf()
    step = checkpoint.read_manifest(ckpt).get("step", "?")
    print(
        f"wrote {out}: {adapter.DISPLAY_NAME} ({shape.n_layer} layers, {shape.n_embd} wide, "
        f"vocabulary {shape.vocab_size:,}) from {ckpt.name} (step {step}) of {args.run}; load it with "
        f"transformers.{adapter.ARCHITECTURE}.from_pretrained({str(out)!r})"
    )
    return 0
