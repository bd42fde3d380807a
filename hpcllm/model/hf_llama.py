"""Llama folders in the Hugging Face layout (`LlamaForCausalLM`), read and written without
`transformers`: the Llama family's adapter (`ModelFamily.hf()`; `read_config`, `read_weights`,
`config_json`, `to_hf`, as hf_gpt2's).

The networks are the same: hpcllm rotates q and k in Hugging Face's rotate-half layout, so q_proj and
k_proj load unpermuted. Names differ, and hpcllm stacks two groups of weights: `attn.qkv` is q_proj,
k_proj and v_proj one above the other, `mlp.gate_up` is gate_proj above up_proj. Every option of
LlamaConfig that changes the arithmetic is read, and one hpcllm does not implement is refused in
one line naming it, never dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hpcllm.errors import UsageError
from hpcllm.model.family import model_setting
from hpcllm.model.hf_folder import CONFIG, TOKENIZER_FILE, weight_files
from hpcllm.model.llama_shape import ROPE_SCALING_KEYS, LlamaShape, rope_scaling_text

DISPLAY_NAME = "Llama"
ARCHITECTURE = "LlamaForCausalLM"
PREFIX = "model."  # of every tensor but lm_head

# Per block: hpcllm's name -> the Hugging Face tensors stacked in it, in order.
_BLOCK_TENSORS = {
    "ln_1.weight": ("input_layernorm.weight",),
    "ln_2.weight": ("post_attention_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.proj.weight": ("self_attn.o_proj.weight",),
    "attn.proj.bias": ("self_attn.o_proj.bias",),
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.gate_up.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "mlp.proj.weight": ("mlp.down_proj.weight",),
    "mlp.proj.bias": ("mlp.down_proj.bias",),
}
_BIASES = {"attn.qkv.bias": "attention", "attn.proj.bias": "attention"}
_BIASES |= {"mlp.gate_up.bias": "mlp", "mlp.proj.bias": "mlp"}


@dataclass(frozen=True)
class LlamaFolder:
    path: Path
    shape: LlamaShape  # its vocabulary the folder's

    @property
    def vocab_size(self) -> int:
        return self.shape.vocab_size

    def model_settings(self) -> list[str]:
        """The shape as configuration assignments (`model.KEY=VALUE`); the context a run trains at
        stays model.block_size (rotary positions have no table to outgrow)."""
        s = self.shape
        keys: dict[str, Any] = {"family": "llama", "n_layer": s.n_layer, "n_embd": s.n_embd}
        keys |= {"n_head": s.n_head, "n_kv_head": s.n_kv_head, "head_dim": s.head_dim}
        keys |= {"ffn_hidden": s.ffn_hidden, "rope_theta": s.rope_theta, "norm_eps": s.norm_eps}
        keys |= {"tie_embeddings": s.tie_embeddings, "attention_bias": s.attention_bias}
        keys |= {"mlp_bias": s.mlp_bias}
        keys["rope_scaling"] = rope_scaling_text(s.rope_scaling) if s.rope_scaling else ""
        return [model_setting(key, value) for key, value in keys.items()]


def _name_map(shape: LlamaShape) -> dict[str, tuple[str, ...]]:
    """Every hpcllm tensor name -> the Hugging Face names stacked in it."""
    names: dict[str, tuple[str, ...]] = {"wte.weight": ("model.embed_tokens.weight",)}
    names["ln_f.weight"] = ("model.norm.weight",)
    if not shape.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight",)
    has = {"attention": shape.attention_bias, "mlp": shape.mlp_bias}
    for layer in range(shape.n_layer):
        for ours, theirs in _BLOCK_TENSORS.items():
            if ours in _BIASES and not has[_BIASES[ours]]:
                continue
            names[f"blocks.{layer}.{ours}"] = tuple(f"{PREFIX}layers.{layer}.{t}" for t in theirs)
    return names


def _rope(config: dict[str, Any], path: Path) -> tuple[float, tuple[float, ...]]:
    """rope_theta and the Llama 3 scaling, from transformers 5's `rope_parameters` or the older
    `rope_theta` and `rope_scaling`."""
    parameters = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(parameters.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = parameters.pop("rope_type", parameters.pop("type", "default"))
    if kind == "default":
        return theta, ()
    if kind != "llama3":
        raise UsageError(
            f"{path}: rope_type {kind!r} is not supported (hpcllm implements default and llama3)"
        )
    try:
        return theta, tuple(float(parameters[key]) for key in ROPE_SCALING_KEYS)
    except KeyError as exc:
        raise UsageError(f"{path}: the llama3 rope scaling lacks {exc}") from None


def _refuse_unsupported(config: dict[str, Any], path: Path) -> None:
    """LlamaConfig options whose other values change the arithmetic in ways hpcllm does not."""
    unsupported = []
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {config['hidden_act']!r} (hpcllm's SwiGLU uses silu)")
    if config.get("pretraining_tp", 1) != 1:
        unsupported.append(f"pretraining_tp {config['pretraining_tp']} (its sliced matmuls; re-save with 1)")
    if config.get("attention_dropout", 0.0):
        unsupported.append(f"attention_dropout {config['attention_dropout']} (hpcllm's Llama has no dropout)")
    if unsupported:
        raise UsageError(f"{path}: LlamaConfig option hpcllm does not support: {'; '.join(unsupported)}")


def read_config(folder: str | Path) -> LlamaFolder:
    """The shape of a Llama folder; one line saying why when it is not one hpcllm can run."""
    path = Path(folder)
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path / CONFIG} is not readable JSON ({exc})") from exc
    _refuse_unsupported(config, path)
    theta, scaling = _rope(config, path)
    try:
        n_embd, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
        shape = LlamaShape(
            vocab_size=int(config["vocab_size"]),
            block_size=int(config.get("max_position_embeddings", 2048)),
            n_layer=int(config["num_hidden_layers"]),
            n_head=n_head,
            n_embd=n_embd,
            n_kv_head=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or n_embd // n_head),
            ffn_hidden=int(config["intermediate_size"]),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{path / CONFIG} lacks a usable {exc} field") from exc
    if shape.n_head % shape.n_kv_head:
        raise UsageError(
            f"{path}: num_attention_heads {shape.n_head} is not divisible by "
            f"num_key_value_heads {shape.n_kv_head}"
        )
    if not (path / TOKENIZER_FILE).is_file():
        raise UsageError(
            f"{path} has no {TOKENIZER_FILE}; save the tokenizer as a fast tokenizer "
            "(tokenizer.save_pretrained) next to the model"
        )
    folder_ = LlamaFolder(path, shape)
    _check_weights(folder_)
    return folder_


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _expected_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """The shapes config.json implies, for the tensors that show a contradiction first."""
    d, q, kv, f, v = shape.n_embd, shape.q_width, shape.kv_width, shape.ffn_hidden, shape.vocab_size
    first = f"{PREFIX}layers.0."
    expected = {f"{PREFIX}embed_tokens.weight": (v, d), f"{first}self_attn.q_proj.weight": (q, d)}
    expected |= {f"{first}self_attn.k_proj.weight": (kv, d), f"{first}mlp.gate_proj.weight": (f, d)}
    return expected | ({} if shape.tie_embeddings else {"lm_head.weight": (v, d)})


def _check_weights(folder: LlamaFolder) -> None:
    """Every tensor the config implies is stored, with its shape (read from the files' headers only)."""
    shapes = _stored_shapes(folder.path)
    for stacked in _name_map(folder.shape).values():
        for theirs in stacked:
            if theirs not in shapes:
                raise UsageError(f"{folder.path}: the weights lack {theirs}; is it a Llama checkpoint?")
    for theirs, expected in _expected_shapes(folder.shape).items():
        if shapes[theirs] != expected:
            raise UsageError(
                f"{folder.path}: {theirs} is {shapes[theirs]}, but config.json implies {expected}"
            )


def read_weights(folder: LlamaFolder, wanted: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors (those `wanted`, else all) under hpcllm's single-process names, of a
    folder `read_config` checked. Only the wanted tensors are read from the files."""
    names = {ours: theirs for ours, theirs in _name_map(folder.shape).items() if not wanted or ours in wanted}
    needed = {name for stacked in names.values() for name in stacked}
    stored: dict[str, torch.Tensor] = {}
    for file in weight_files(folder.path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in needed:
                    stored[key] = f.get_tensor(key)
    return {ours: torch.cat([stored[t].float() for t in theirs]) for ours, theirs in names.items()}


def to_hf(state: dict[str, torch.Tensor], shape: LlamaShape) -> dict[str, torch.Tensor]:
    """hpcllm's whole-model tensors under Hugging Face's names (as `save_pretrained` writes them)."""
    out = {}
    for ours, theirs in _name_map(shape).items():
        whole = state[ours].detach().float().cpu()
        sizes = _stack_sizes(ours, shape)
        for name, part in zip(theirs, whole.split(sizes) if sizes else (whole,), strict=True):
            out[name] = part.contiguous()
    return out


def _stack_sizes(ours: str, shape: LlamaShape) -> tuple[int, ...]:
    if ".attn.qkv." in ours:
        return (shape.q_width, shape.kv_width, shape.kv_width)
    if ".mlp.gate_up." in ours:
        return (shape.ffn_hidden, shape.ffn_hidden)
    return ()


def config_json(shape: LlamaShape, boundaries: Any) -> dict:
    """LlamaConfig's config.json for this shape (the rope settings in the form transformers 4 and 5
    both read); `boundaries`: the tokenizer's DocumentTokens."""
    rope_scaling = None
    if shape.rope_scaling:
        rope_scaling = {
            "rope_type": "llama3",
            **dict(zip(ROPE_SCALING_KEYS, shape.rope_scaling, strict=True)),
        }
        rope_scaling["original_max_position_embeddings"] = int(
            rope_scaling["original_max_position_embeddings"]
        )
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.n_embd,
        "intermediate_size": shape.ffn_hidden,
        "num_hidden_layers": shape.n_layer,
        "num_attention_heads": shape.n_head,
        "num_key_value_heads": shape.n_kv_head,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.block_size,
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": shape.tie_embeddings,
        "attention_bias": shape.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": shape.mlp_bias,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "bos_token_id": boundaries.bos,
        "eos_token_id": boundaries.eos,
        "dtype": "float32",
    }
