"""The shape of a GPT-2 model: what the network, the planner and the formulas read (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class GPTShape:
    family_name: ClassVar[str] = "gpt2"  # its family in hpcllm.model.registry
    tie_embeddings: ClassVar[bool] = True  # the output head is the token embedding

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head
