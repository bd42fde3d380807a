"""`train.init_from`: a new run's weights from somewhere else than the seed:

    hf:DIR           a Hugging Face folder, read by the adapter of the family its config.json names
                     (`ModelFamily.hf()`);
    run:DIR[@STEP]   an hpcllm run's checkpoint (its latest, or step STEP), of any layout, with a
                     fresh optimizer and learning-rate schedule (fine-tuning a model pretrained here).

The source decides the model's family and shape; its tokenizer must be the one the data was
prepared with (`hpcllm prepare --tokenizer DIR`), or the token ids would mean other words. Every
rank reads only its own tensors and cuts them by its tensor-parallel split, so any tp/pp starts
alike. A resumed run takes its weights from its checkpoint, never from the source again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcllm.data import tokenizer as tok
from hpcllm.data.tokens import Prepared
from hpcllm.errors import UsageError
from hpcllm.model import hf_folder
from hpcllm.model.family import model_setting
from hpcllm.model.registry import family_of_hf_folder, family_of_shape
from hpcllm.parallel.fully_sharded import units_of
from hpcllm.parallel.grid import Grid
from hpcllm.training import checkpoint
from hpcllm.training.config import Config

HF, RUN = "hf:", "run:"
# The model keys a run started from another run takes from it (dropout is the new run's own).
_NOT_THE_SHAPE = ("preset", "dropout")


@dataclass(frozen=True)
class RunCheckpoint:
    """An hpcllm run's checkpoint to start from (`run:DIR[@STEP]`)."""

    path: Path  # the run directory (its tokenizer.json is the data's)
    checkpoint: Path
    model: dict[str, Any]  # the run's `model.` section
    vocab_size: int

    def model_settings(self) -> list[str]:
        """The run's model as configuration assignments (`model.KEY=VALUE`)."""
        kept = {key: value for key, value in self.model.items() if key not in _NOT_THE_SHAPE}
        return [model_setting(key, value) for key, value in kept.items()]


def source(config: Config) -> Any:
    """The folder or run named by train.init_from, checked; None when the run starts from the seed."""
    text = config.train.init_from
    if not text:
        return None
    if text.startswith(RUN) and text[len(RUN) :]:
        return _run_checkpoint(text[len(RUN) :])
    if not text.startswith(HF) or not text[len(HF) :]:
        raise UsageError(
            f"train.init_from takes hf:DIR (a Hugging Face model folder) or run:DIR[@STEP] (an hpcllm "
            f"run), not {text!r}"
        )
    path = Path(text[len(HF) :])
    return family_of_hf_folder(path).hf().read_config(path)


def _run_checkpoint(text: str) -> RunCheckpoint:
    import yaml

    where, _, step = text.rpartition("@") if "@" in text else (text, "", "")
    if step and not step.isdigit():
        raise UsageError(f"train.init_from run:{text}: the step after @ must be a number, not {step!r}")
    run = Path(where)
    name = checkpoint.step_name(int(step)) if step else None
    ckpt = checkpoint.run_checkpoint(run, name, given_as="train.init_from run:")
    saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    vocab = tok.load(run / hf_folder.TOKENIZER_FILE).get_vocab_size()
    return RunCheckpoint(run, ckpt, dict(saved.get("model", {})), vocab)


def check_tokenizer(folder: Any, data: Prepared) -> None:
    """The data's token ids must be the folder's."""
    theirs = tok.vocabulary(folder.path / hf_folder.TOKENIZER_FILE)
    if tok.vocabulary(data.tokenizer_path) != theirs or data.vocab_size != folder.vocab_size:
        raise UsageError(
            f"the data in {data.path} was prepared with another tokenizer than {folder.path}'s "
            f"(vocabulary {data.vocab_size:,} vs {folder.vocab_size:,}); prepare it with "
            f"`hpcllm prepare CORPUS --tokenizer {folder.path} --out DIR`"
        )


def load_weights(model: torch.nn.Module, folder: Any, grid: Grid) -> None:
    if isinstance(folder, RunCheckpoint):  # resharded to this layout; the optimizer starts afresh
        checkpoint.load(folder.checkpoint, model, None, grid, restore_rng=False)
        return
    hf = family_of_shape(model.shape).hf()
    units = units_of(model)
    if units is None:
        tensors = hf.read_weights(folder, wanted=set(model.state_dict()))
        checkpoint.load_whole_model(model, tensors, grid, str(folder.path))
        return
    # Fully sharded: one unit's tensors read at a time, each rank keeping its shares of them.
    names = {id(param): name for name, param in model.named_parameters()}
    for params in units.unit_parameters():
        wanted = {names[id(param)] for param in params}
        tensors = hf.read_weights(folder, wanted=wanted)
        checkpoint.load_whole_model(model, tensors, grid, str(folder.path), names=wanted)
