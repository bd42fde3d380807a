"""The model families hpcllm knows, by `model.family`, and every preset by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcllm.errors import UsageError
from hpcllm.model import hf_folder
from hpcllm.model.family import ModelFamily
from hpcllm.model.gpt2 import GPT2
from hpcllm.model.llama import LLAMA

FAMILIES: dict[str, ModelFamily] = {GPT2.name: GPT2, LLAMA.name: LLAMA}

# Preset name -> (family, its shape keys); names are unique over all families.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    preset: (family.name, keys) for family in FAMILIES.values() for preset, keys in family.presets.items()
}


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise UsageError(f"unknown model.family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(model: object) -> ModelFamily:
    """The family of a `model.` config section."""
    return family_named(model.family)  # type: ignore[attr-defined]


def family_of_shape(shape: object) -> ModelFamily:
    """The family a model shape belongs to (its `family_name`)."""
    return family_named(shape.family_name)  # type: ignore[attr-defined]


def family_of_hf_folder(path: Path) -> ModelFamily:
    """The family whose adapter reads a Hugging Face folder, by its config.json's model_type; GPT-2's
    when none matches (its adapter then says, in one line, what the folder is instead)."""
    found = hf_folder.model_type(path)
    return next((family for family in FAMILIES.values() if family.hf_model_type == found), GPT2)
