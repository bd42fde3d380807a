"""GPT-2 folders in the Hugging Face layout, read and written without `transformers`.

The GPT-2 family's Hugging Face adapter (`ModelFamily.hf()`; what every family's adapter has:
`read_config`, `read_weights`, `config_json`, `to_hf`; the folder layout itself is hf_folder's).
hpcllm's GPT and transformers' `GPT2LMHeadModel` are the same network: learned positions, pre-LN
blocks, tanh GELU, attention scaled by 1/sqrt(head_dim), a final LayerNorm and a head tied to the
token embedding. A model moves between the two by renaming tensors and transposing the weights of
GPT-2's Conv1D layers, which keep (in, out) where nn.Linear keeps (out, in). A folder is
`config.json`, `model.safetensors` (or an index of several) and the tokenizer's `tokenizer.json`;
nothing pickled is ever opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hpcllm.errors import UsageError
from hpcllm.model.gpt2_shape import GPTShape
from hpcllm.model.hf_folder import CONFIG, TOKENIZER_FILE, weight_files

DISPLAY_NAME = "GPT-2"
ARCHITECTURE = "GPT2LMHeadModel"  # the transformers class that loads an exported folder
LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which hpcllm's GPT uses
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")

# Per block: hpcllm's name -> (GPT-2's name, stored transposed as a Conv1D weight).
_BLOCK_TENSORS = {
    "ln_1.weight": ("ln_1.weight", False),
    "ln_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False),
    "ln_2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True),
    "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True),
    "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
_OUTER_TENSORS = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight"}
_OUTER_TENSORS |= {"ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}


@dataclass(frozen=True)
class GPT2Folder:
    path: Path
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab_size: int

    def model_settings(self) -> list[str]:
        """The shape as configuration assignments (`model.KEY=VALUE`)."""
        keys = {"n_layer": self.n_layer, "n_embd": self.n_embd, "n_head": self.n_head}
        keys["block_size"] = self.block_size
        return [f"model.{key}={value}" for key, value in keys.items()]


def _name_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    """Every hpcllm tensor name -> (GPT-2 name without the `transformer.` prefix, transposed)."""
    names = {ours: (theirs, False) for ours, theirs in _OUTER_TENSORS.items()}
    for layer in range(n_layer):
        for ours, (theirs, transposed) in _BLOCK_TENSORS.items():
            names[f"blocks.{layer}.{ours}"] = (f"h.{layer}.{theirs}", transposed)
    return names


def read_config(folder: str | Path) -> GPT2Folder:
    """The shape of a GPT-2 folder; one line saying why when it is not one hpcllm can run."""
    path = Path(folder)
    if not (path / CONFIG).is_file():
        raise UsageError(f"{path} is not a Hugging Face model folder ({CONFIG} missing)")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path / CONFIG} is not readable JSON ({exc})") from exc
    if config.get("model_type") != "gpt2":
        raise UsageError(
            f"{path} holds a {config.get('model_type')!r} model; hpcllm reads gpt2 and llama folders "
            "(LlamaForCausalLM covers Llama 2/3, Mistral-shaped and Qwen2-style models)"
        )
    problems = []
    activation = config.get("activation_function", "gelu_new")
    if activation not in TANH_GELU:
        problems.append(f"activation {activation!r} (hpcllm's MLP uses tanh GELU)")
    inner = config.get("n_inner")
    if inner not in (None, 4 * config.get("n_embd", 0)):
        problems.append(f"n_inner {inner} (hpcllm's MLP is 4 x n_embd)")
    if abs(config.get("layer_norm_epsilon", LAYER_NORM_EPS) - LAYER_NORM_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon {config['layer_norm_epsilon']} (hpcllm uses {LAYER_NORM_EPS})")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False:
        problems.append("attention scaling other than 1/sqrt(head_dim)")
    if not config.get("tie_word_embeddings", True):
        problems.append("an output head not tied to the token embedding")
    if problems:
        raise UsageError(f"{path}: GPT-2 variant hpcllm's GPT cannot hold: {'; '.join(problems)}")
    try:
        shape = GPT2Folder(
            path,
            int(config["n_layer"]),
            int(config["n_embd"]),
            int(config["n_head"]),
            int(config["n_positions"]),
            int(config["vocab_size"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{path / CONFIG} lacks a usable {exc} field") from exc
    if shape.n_embd % shape.n_head:
        raise UsageError(f"{path}: n_embd {shape.n_embd} is not divisible by n_head {shape.n_head}")
    if not (path / TOKENIZER_FILE).is_file():
        raise UsageError(
            f"{path} has no {TOKENIZER_FILE}; save the tokenizer as a fast tokenizer "
            "(tokenizer.save_pretrained) next to the model"
        )
    _check_weights(shape)
    return shape


def _check_weights(folder: GPT2Folder) -> None:
    """Every tensor the config implies is stored, with its shape (read from the files' headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(folder.path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[key.removeprefix("transformer.")] = tuple(f.get_slice(key).get_shape())
    h, v, s = folder.n_embd, folder.vocab_size, folder.block_size
    expected = {"wte.weight": (v, h), "wpe.weight": (s, h), "h.0.attn.c_attn.weight": (h, 3 * h)}
    for theirs, _ in _name_map(folder.n_layer).values():
        if theirs not in shapes:
            raise UsageError(f"{folder.path}: the weights lack {theirs}; is it a GPT-2 checkpoint?")
        if theirs in expected and shapes[theirs] != expected[theirs]:
            raise UsageError(
                f"{folder.path}: {theirs} is {shapes[theirs]}, but config.json implies {expected[theirs]}"
            )


def read_weights(folder: GPT2Folder, wanted: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors (those `wanted`, else all) under hpcllm's single-process names, of a
    folder `read_config` checked. Only the wanted tensors are read from the files."""
    names = {ours: found for ours, found in _name_map(folder.n_layer).items() if not wanted or ours in wanted}
    needed = {theirs for theirs, _ in names.values()}
    stored: dict[str, torch.Tensor] = {}
    for file in weight_files(folder.path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.removeprefix("transformer.") in needed:
                    stored[key.removeprefix("transformer.")] = f.get_tensor(key)
    tensors = {}
    for ours, (theirs, transposed) in names.items():
        tensor = stored[theirs].float()  # present and shaped as the config says: read_config checked
        tensors[ours] = tensor.t().contiguous() if transposed else tensor
    return tensors


def to_hf(state: dict[str, torch.Tensor], shape: GPTShape) -> dict[str, torch.Tensor]:
    """hpcllm's whole-model tensors under GPT-2's names (as `save_pretrained` writes them)."""
    out = {}
    for ours, (theirs, transposed) in _name_map(shape.n_layer).items():
        tensor = state[ours].detach().float().cpu()
        out[f"transformer.{theirs}"] = (tensor.t() if transposed else tensor).contiguous()
    return out


def config_json(shape: GPTShape, boundaries: Any) -> dict:
    """GPT-2's config.json for this shape: no dropout (inference and fine-tuning set their own);
    `boundaries`: the tokenizer's DocumentTokens (GPT-2's end-of-text begins and ends a text)."""
    eot = boundaries.eos
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "gpt2",
        "vocab_size": shape.vocab_size,
        "n_positions": shape.block_size,
        "n_embd": shape.n_embd,
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": "float32",
    }
