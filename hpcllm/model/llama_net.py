"""The Llama network, as a GPT (hpcllm.model.gpt) with other parts: token embeddings without learned
positions, pre-RMSNorm blocks whose attention rotates q and k by position (hpcllm.model.rope) and
groups query heads over fewer key/value heads, a SwiGLU MLP, a final RMSNorm and an output head
that is tied or has its own weight. Everything else (pipeline stages, recomputation, sequence
parallelism, the KV cache, the loss) is the GPT's.

Module names follow GPT-2's so that one tensor-parallel plan shape and one checkpoint layout serve
both: `attn.qkv` holds q, k and v stacked (n_head, n_kv_head, n_kv_head heads), `mlp.gate_up` the
gate and up projections stacked, `mlp.proj` the down projection (hpcllm.model.hf_llama maps the
names to Hugging Face's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hpcllm.model.dropout import DropoutKeys
from hpcllm.model.gpt import GPT
from hpcllm.model.gpt_block import Block, run
from hpcllm.model.kv_cache import KVCache
from hpcllm.model.llama_shape import LlamaShape
from hpcllm.model.rope import Rotary, angle_table, apply_rotary, inverse_frequencies, rotary_at
from hpcllm.parallel.context.ring_attention import ring_attention


class GroupedQueryAttention(nn.Module):
    def __init__(self, shape: LlamaShape, index: int):
        super().__init__()
        self.index = index  # the block's global index: its slot in a KV cache
        self.head_dim = shape.head_dim
        # q's share of qkv's heads: n_head of n_head + 2 n_kv_head (on every TP rank alike)
        self.q_heads_of = (shape.n_head, shape.n_head + 2 * shape.n_kv_head)
        self.qkv = nn.Linear(shape.n_embd, shape.q_width + 2 * shape.kv_width, bias=shape.attention_bias)
        self.proj = nn.Linear(shape.q_width, shape.n_embd, bias=shape.attention_bias)
        self.recompute_core = False  # selective recomputation: keep only q, k, v for backward
        # Context parallelism: (the CP group's communicator, the positions this rank holds).
        self.context: tuple[Any, torch.Tensor] | None = None

    def core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention over the grouped heads: each key/value head serves n_head / n_kv_head queries
        (the cache holds only the key/value heads)."""
        if self.context is not None:  # context parallelism: the other ranks' keys come by the ring
            # (`mask` carries the held tokens' documents then: Trainer._context_part)
            return ring_attention(q, k, v, self.context[1], self.context[0], documents=mask)
        causal = mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        keys: DropoutKeys | None = None,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        qkv = run(self.qkv, x)
        batch, time, width = qkv.shape  # the whole sequence, also with sequence parallelism
        # This rank's heads (all of them without TP): q's, then k's and v's, as the plan splits them.
        heads = width // self.head_dim
        q_heads = heads * self.q_heads_of[0] // self.q_heads_of[1]
        kv_heads = (heads - q_heads) // 2
        # q and k are rotated together (one set of operators: decoding steps are overhead-bound).
        heads_first = qkv.view(batch, time, heads, self.head_dim).transpose(1, 2)
        rotated = apply_rotary(heads_first[:, : q_heads + kv_heads], rotary)
        q, k, v = rotated[:, :q_heads], rotated[:, q_heads:], heads_first[:, q_heads + kv_heads :]
        if cache is not None:
            k, v = cache.extend(self.index, k, v)
        if self.recompute_core and torch.is_grad_enabled():
            attended = checkpoint(self.core, q, k, v, mask, use_reentrant=False)
        else:
            attended = self.core(q, k, v, mask)
        return run(self.proj, attended.transpose(1, 2).reshape(batch, time, -1))


class SwiGLU(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.gate_up = nn.Linear(shape.n_embd, 2 * shape.ffn_hidden, bias=shape.mlp_bias)
        self.proj = nn.Linear(shape.ffn_hidden, shape.n_embd, bias=shape.mlp_bias)

    def forward(self, x: torch.Tensor, keys: DropoutKeys | None = None) -> torch.Tensor:
        gate, up = run(self.gate_up, x).chunk(2, dim=-1)  # this rank's slices of both
        return run(self.proj, F.silu(gate) * up)


class Llama(GPT):
    shape: LlamaShape

    def __init__(
        self,
        shape: LlamaShape,
        seed: int | None = None,
        layers: range | None = None,
        first: bool = True,
        last: bool = True,
    ):
        super().__init__(shape, seed, layers, first, last)
        # Kept in float32 outside the module's tensors, so casting the model never rounds them, and
        # not in checkpoints: they follow from the shape.
        self._inverse_frequencies = inverse_frequencies(shape.head_dim, shape.rope_theta, shape.rope_scaling)
        self._angles: dict[torch.device, Rotary] = {}  # per device: cos, sin of every position

    def _position_embedding(self) -> None:
        return None  # rotary: the attention rotates q and k instead

    def _block(self, index: int) -> nn.Module:
        shape = self.shape
        return Block(self._norm(), GroupedQueryAttention(shape, index), self._norm(), SwiGLU(shape))

    def _norm(self) -> nn.Module:
        return nn.RMSNorm(self.shape.n_embd, eps=self.shape.norm_eps)

    def rotary(self, positions: torch.Tensor | None, hidden: torch.Tensor) -> Rotary:
        """Positions 0..T-1 of the whole sequence in training (with sequence parallelism `hidden`
        holds this rank's part, but attention sees all of it), or decoding's own per row. Both stay
        below block_size (forward refuses longer sequences, decoding slides its window), so one
        table of block_size positions per device serves every forward."""
        table = self._angles.get(hidden.device)
        if table is None:
            table = angle_table(self._inverse_frequencies, self.shape.block_size, hidden.device)
            self._angles[hidden.device] = table
        parts = 1 if self.sequence_group is None else self.sequence_group.size
        return rotary_at(table, hidden.shape[1] * parts if positions is None else positions)
