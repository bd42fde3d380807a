"""GPT-2's transformer block: causal self-attention and the GELU MLP, each behind a pre-LayerNorm
and a residual connection; and `run`, a module call without nn.Module's machinery outside autograd."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hpcllm.model.dropout import (
    ATTENTION,
    ATTENTION_OUT,
    MLP_OUT,
    DropoutKeys,
    block_site,
    dropout,
    keyed_dropout,
)
from hpcllm.model.gpt2_shape import GPTShape
from hpcllm.model.kv_cache import KVCache
from hpcllm.model.rope import Rotary
from hpcllm.parallel.context.ring_attention import ring_attention


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape, index: int):
        super().__init__()
        self.index = index  # the block's global index: its slot in a KV cache
        self.head_dim = shape.head_dim
        self.dropout = shape.dropout
        self.qkv = nn.Linear(shape.n_embd, 3 * shape.n_embd)
        self.proj = nn.Linear(shape.n_embd, shape.n_embd)
        self.recompute_core = False  # selective recomputation: keep only q, k, v for backward
        # Context parallelism: (the CP group's communicator, the positions this rank holds).
        self.context: tuple[Any, torch.Tensor] | None = None

    def core(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        keys: DropoutKeys | None = None,
    ) -> torch.Tensor:
        """Scores, causal softmax, dropout and the weighted sum: the part whose activations grow with
        the square of the sequence, and the cheapest to recompute. `mask` (decoding padded rows,
        packed documents) replaces the causal rule; one new query over a cache sees every key.
        With keyed dropout the attention is written out (the fused kernel draws its own mask)."""
        if self.context is not None:  # context parallelism: the other ranks' keys come by the ring
            # (`mask` carries the held tokens' documents then: Trainer._context_part)
            return ring_attention(q, k, v, self.context[1], self.context[0], documents=mask)
        causal = mask is None and q.shape[2] > 1
        if self.training and self.dropout and keys is not None:
            return self._keyed_dropout_core(q, k, v, keys, mask)
        dropout = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)

    def _keyed_dropout_core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: DropoutKeys, mask: torch.Tensor | None
    ) -> torch.Tensor:
        heads, time = q.shape[1], q.shape[2]
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if mask is None:
            hidden = torch.ones(time, time, dtype=torch.bool, device=q.device).triu(1)
        else:
            hidden = ~mask
        probs = F.softmax(scores.masked_fill(hidden, float("-inf")).float(), dim=-1).to(q.dtype)
        # An element is (global head, query, key): this rank's heads follow the other TP ranks'.
        site, strides = block_site(self.index, ATTENTION), (time * time, time, 1)
        probs = keyed_dropout(probs, self.dropout, keys, site, strides, keys.tp_rank * heads * time * time)
        return probs @ v

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        keys: DropoutKeys | None = None,
        rotary: Rotary | None = None,  # GPT-2's positions are learned: unused
    ) -> torch.Tensor:
        qkv = run(self.qkv, x)
        batch, time, _ = qkv.shape  # the whole sequence, also when x holds part of it (sequence parallel)
        # Heads are read off the qkv output, so splitting qkv's columns by head splits attention: a
        # tensor-parallel rank sees its own heads only.
        q, k, v = qkv.view(batch, time, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.extend(self.index, k, v)
        if self.recompute_core and torch.is_grad_enabled():
            attended = checkpoint(self.core, q, k, v, mask, keys, use_reentrant=False)
        elif (self.training and self.dropout) or self.context is not None:
            attended = self.core(q, k, v, mask, keys)
        else:  # the core without its call: decoding steps are overhead-bound
            causal = mask is None and q.shape[2] > 1
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        out = run(self.proj, attended.transpose(1, 2).reshape(batch, time, -1))
        if not (self.training and self.dropout):  # decoding: no call at all (its steps are overhead-bound)
            return out
        return residual_dropout(out, self.dropout, keys, block_site(self.index, ATTENTION_OUT))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape, index: int):
        super().__init__()
        self.index = index
        self.dropout = shape.dropout
        self.fc = nn.Linear(shape.n_embd, 4 * shape.n_embd)
        self.proj = nn.Linear(4 * shape.n_embd, shape.n_embd)

    def forward(self, x: torch.Tensor, keys: DropoutKeys | None = None) -> torch.Tensor:
        out = run(self.proj, F.gelu(run(self.fc, x), approximate="tanh"))
        if not (self.training and self.dropout):
            return out
        return residual_dropout(out, self.dropout, keys, block_site(self.index, MLP_OUT))


def residual_dropout(x: torch.Tensor, p: float, keys: DropoutKeys | None, site: int) -> torch.Tensor:
    """Training dropout on the residual stream [batch, time, features]: an element is (position,
    feature); with sequence parallelism this rank's positions follow the other TP ranks'."""
    if keys is None:
        return dropout(x, p, True, keys, site, ())
    time, width = x.shape[1], x.shape[2]
    return dropout(x, p, True, keys, site, (width, 1), keys.sequence_offset(time) * width)


class Block(nn.Module):
    """A pre-norm transformer block of a family's parts (GPT-2's: LayerNorms, attention with
    learned positions, a GELU MLP; hpcllm.model.llama_net passes Llama's)."""

    def __init__(self, ln_1: nn.Module, attn: nn.Module, ln_2: nn.Module, mlp: nn.Module):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        keys: DropoutKeys | None = None,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        """`rotary`: the (cos, sin) of rotary positions, for the families that rotate q and k."""
        if x.requires_grad:
            x = x + self.attn(self.ln_1(x), cache, mask, keys, rotary)
            return x + self.mlp(self.ln_2(x), keys)
        # Outside autograd (decoding): the same, without nn.Module's call machinery (see `run`).
        x = x + self.attn.forward(run(self.ln_1, x), cache, mask, keys, rotary)
        return x + self.mlp.forward(run(self.ln_2, x), keys)


def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`; outside autograd (decoding, evaluation) a plain Linear or LayerNorm as its
    kernel, without nn.Module's call machinery: a decoding step of a small model is mostly
    per-operator overhead (module calls cost 3-5% of batch-1 decoding, measured). The same
    arithmetic either way; module hooks fire in training."""
    if not x.requires_grad:
        kind = type(module)
        if kind is nn.Linear:
            return F.linear(x, module.weight, module.bias)
        if kind is nn.LayerNorm:
            return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
        if kind is nn.RMSNorm:
            return F.rms_norm(x, module.normalized_shape, module.weight, module.eps)
    return module(x)
