"""The shape of a Llama-family model: what the network, the planner and the formulas read (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

# Llama 3's RoPE frequency scaling, in Hugging Face's rope_scaling names and this order.
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class LlamaShape:
    family_name: ClassVar[str] = "llama"  # its family in hpcllm.model.registry

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int
    head_dim: int
    ffn_hidden: int
    rope_theta: float = 10000.0
    rope_scaling: tuple[float, ...] = ()  # ROPE_SCALING_KEYS' values, () for none
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    dropout: float = 0.0  # always 0: Llama trains without dropout (the family refuses another value)

    @property
    def q_width(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_head * self.head_dim


def parse_rope_scaling(text: str) -> tuple[float, ...]:
    """`factor=32,low_freq_factor=1,...` -> the values in ROPE_SCALING_KEYS' order; "" -> ().
    ValueError names what is wrong."""
    if not text.strip():
        return ()
    given: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ROPE_SCALING_KEYS:
            raise ValueError(
                f"{part.strip()!r} is not one of {', '.join(k + '=N' for k in ROPE_SCALING_KEYS)}"
            )
        given[key] = float(value)
    missing = [key for key in ROPE_SCALING_KEYS if key not in given]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    return tuple(given[key] for key in ROPE_SCALING_KEYS)


def rope_scaling_text(values: tuple[float, ...]) -> str:
    """The inverse of parse_rope_scaling."""
    return ",".join(f"{key}={value:g}" for key, value in zip(ROPE_SCALING_KEYS, values, strict=True))


# The `model.` keys only the Llama family reads, with the values that mean "not used" (ModelConfig's
# defaults): another family refuses a config that sets one of them otherwise.
LLAMA_KEYS: dict[str, object] = {
    "n_kv_head": 0,
    "head_dim": 0,
    "ffn_hidden": 0,
    "rope_theta": 10000.0,
    "rope_scaling": "",
    "norm_eps": 1e-5,
    "tie_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
}


def swiglu_width(n_embd: int) -> int:
    """The default SwiGLU width: 8/3 n_embd (the parameters of a 4 n_embd GELU MLP), rounded up to
    a multiple of 64 as the Llama papers round theirs."""
    return -(-(8 * n_embd // 3) // 64) * 64
