"""A Hugging Face model folder, whatever the model: its files, and what every family's adapter reads
and writes the same way. A folder is `config.json`, `model.safetensors` (or an index of several)
and the tokenizer's `tokenizer.json` with its `tokenizer_config.json`; nothing pickled is ever
opened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcllm.errors import UsageError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def model_type(path: Path) -> str | None:
    """config.json's `model_type`, or None when there is no readable one (the adapter says why)."""
    try:
        return json.loads((path / CONFIG).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def weight_files(path: Path) -> list[Path]:
    """The folder's safetensors files; one line saying why when there are none hpcllm opens."""
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / WEIGHTS_INDEX).is_file():
        index = json.loads((path / WEIGHTS_INDEX).read_text())
        return [path / name for name in sorted(set(index["weight_map"].values()))]
    pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    if pickled:
        raise UsageError(
            f"{path} holds weights only in pickle format ({pickled[0]}); hpcllm does not open pickles. "
            "Re-save with model.save_pretrained(DIR) (safetensors is its default)"
        )
    raise UsageError(f"{path} has no {WEIGHTS}")


def tokenizer_config(block_size: int, tokenizer: Any, boundaries: Any) -> dict:
    """What `AutoTokenizer.from_pretrained` needs to take tokenizer.json as a fast tokenizer, with
    the document tokens (hpcllm.data.tokenizer.DocumentTokens) as its beginning and end."""
    eos = tokenizer.id_to_token(boundaries.eos)
    bos = eos if boundaries.bos is None else tokenizer.id_to_token(boundaries.bos)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": eos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
