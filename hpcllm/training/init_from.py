"""`train.init_from`: a new run's weights from a Hugging Face folder instead of the seed, read by the
adapter of the family its config.json names (`ModelFamily.hf()`).

The folder decides the model's family and shape; its tokenizer must be the one the data was prepared with
(`hpcllm prepare --tokenizer DIR`), or the token ids would mean other words. Every rank reads
only its own tensors and cuts them by its tensor-parallel split, so any tp/pp starts alike.
A resumed run takes its weights from its checkpoint, never from the folder again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hpcllm.data import tokenizer as tok
from hpcllm.data.tokens import Prepared
from hpcllm.errors import UsageError
from hpcllm.model import hf_folder
from hpcllm.model.registry import family_of_hf_folder, family_of_shape
from hpcllm.parallel.grid import Grid
from hpcllm.training import checkpoint
from hpcllm.training.config import Config

HF = "hf:"


def source(config: Config) -> Any:
    """The folder named by train.init_from, checked; None when the run starts from the seed."""
    text = config.train.init_from
    if not text:
        return None
    if not text.startswith(HF) or not text[len(HF) :]:
        raise UsageError(f"train.init_from takes hf:DIR (a Hugging Face model folder), not {text!r}")
    path = Path(text[len(HF) :])
    return family_of_hf_folder(path).hf().read_config(path)


def check_tokenizer(folder: Any, data: Prepared) -> None:
    """The data's token ids must be the folder's."""
    ours = tok.load(data.tokenizer_path).get_vocab(with_added_tokens=True)
    theirs = tok.load(folder.path / hf_folder.TOKENIZER_FILE).get_vocab(with_added_tokens=True)
    if ours != theirs or data.vocab_size != folder.vocab_size:
        raise UsageError(
            f"the data in {data.path} was prepared with another tokenizer than {folder.path}'s "
            f"(vocabulary {data.vocab_size:,} vs {folder.vocab_size:,}); prepare it with "
            f"`hpcllm prepare CORPUS --tokenizer {folder.path} --out DIR`"
        )


def load_weights(model: torch.nn.Module, folder: Any, grid: Grid) -> None:
    tensors = family_of_shape(model.shape).hf().read_weights(folder, wanted=set(model.state_dict()))
    checkpoint.load_whole_model(model, tensors, grid, str(folder.path))
