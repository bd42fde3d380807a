"""A decoder-only GPT, readable top to bottom.

token + position embeddings → n_layer pre-LayerNorm blocks (causal self-attention through
`scaled_dot_product_attention`, GELU MLP) → final LayerNorm → output head tied to the token embedding.

The forward pass is split into `embed`, the `blocks` list and `head` so that a pipeline stage can
run any contiguous slice of it, and a stage builds only that slice; every Linear and Embedding is
a plain module that tensor parallelism replaces by its partitioned counterpart once the stage is
initialised.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hpcllm.parallel.sharding import Sharding
from hpcllm.parallel.tensor.collectives import TensorCollectives
from hpcllm.parallel.tensor.mappings import scatter_to_sequence


@dataclass(frozen=True)
class GPTShape:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def block_parameters(self) -> int:
        """qkv, attention projection, MLP in and out, two LayerNorms."""
        return 12 * self.n_embd**2 + 13 * self.n_embd

    @property
    def parameter_count(self) -> int:
        """Of the whole model (the head is tied to the token embedding)."""
        embeddings = (self.vocab_size + self.block_size) * self.n_embd
        return embeddings + self.n_layer * self.block_parameters + 2 * self.n_embd


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.n_head = shape.n_head
        self.dropout = shape.dropout
        self.qkv = nn.Linear(shape.n_embd, 3 * shape.n_embd)
        self.proj = nn.Linear(shape.n_embd, shape.n_embd)
        self.resid_dropout = nn.Dropout(shape.dropout)
        self.recompute_core = False  # selective recomputation: keep only q, k, v for backward

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scores, causal softmax, dropout and the weighted sum: the part whose activations grow with
        the square of the sequence, and the cheapest to recompute."""
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        batch, time, _ = qkv.shape  # the whole sequence, also when x holds part of it (sequence parallel)
        # Heads are read off the qkv output, so splitting qkv's columns by head splits attention.
        q, k, v = qkv.view(batch, time, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        if self.recompute_core and torch.is_grad_enabled():
            attended = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            attended = self.core(q, k, v)
        return self.resid_dropout(self.proj(attended.transpose(1, 2).reshape(batch, time, -1)))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.fc = nn.Linear(shape.n_embd, 4 * shape.n_embd)
        self.proj = nn.Linear(4 * shape.n_embd, shape.n_embd)
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.n_embd)
        self.attn = CausalSelfAttention(shape)
        self.ln_2 = nn.LayerNorm(shape.n_embd)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TiedHead(nn.Module):
    """Output logits through the token embedding's weight (passed in, so it is not registered twice),
    and the loss over them. Tensor parallelism swaps in a vocabulary-parallel version."""

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, embedding_weight)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, targets)


class GPT(nn.Module):
    """The model, or one pipeline stage of it: `layers` (the blocks it runs), `first` (it embeds the
    tokens) and `last` (it has the head). A stage builds only its own parts, and every tensor is
    initialised from its own generator keyed by `seed` and the tensor's name, so a stage holds
    exactly the single-process values without the rest of the model ever being built. `seed=None`
    draws it from torch's global generator (so `torch.manual_seed` before it decides)."""

    def __init__(
        self,
        shape: GPTShape,
        seed: int | None = None,
        layers: range | None = None,
        first: bool = True,
        last: bool = True,
    ):
        super().__init__()
        self.shape = shape
        layers = range(shape.n_layer) if layers is None else layers
        # Parts a pipeline stage does not run are None on that stage; the last stage of several
        # holds a copy of the token embedding for the tied head.
        self.wte: nn.Module | None = nn.Embedding(shape.vocab_size, shape.n_embd) if first or last else None
        self.wpe: nn.Embedding | None = nn.Embedding(shape.block_size, shape.n_embd) if first else None
        self.drop: nn.Dropout | None = nn.Dropout(shape.dropout) if first else None
        # Blocks keep their global index in parameter names, so checkpoints of any pipeline size
        # name a tensor alike.
        self.blocks = nn.ModuleList(
            Block(shape) if index in layers else nn.Identity() for index in range(shape.n_layer)
        )
        self.ln_f: nn.LayerNorm | None = nn.LayerNorm(shape.n_embd) if last else None
        self.lm_head: nn.Module = TiedHead()
        self.stage_layers = layers  # the blocks this model runs
        self.holds_tied_copy = last and not first  # of the embedding the first stage owns
        self.recompute = "none"  # see set_recompute
        # Sequence parallelism: the residual stream holds this TP rank's part of the sequence.
        self.sequence_group: TensorCollectives | None = None
        self._init_weights(int(torch.randint(2**62, ()).item()) if seed is None else seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """GPT-2's initialisation: N(0, 0.02) for every Linear and Embedding weight, the residual
        projections scaled down with depth (0.02 / sqrt(2 n_layer)) so the residual stream stays
        O(1), zero biases, LayerNorms at identity."""
        residual_std = 0.02 / math.sqrt(2 * self.shape.n_layer)
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear | nn.Embedding):
                continue
            std = residual_std if name.endswith(("attn.proj", "mlp.proj")) else 0.02
            generator = torch.Generator().manual_seed((seed + zlib.crc32(name.encode())) % 2**63)
            module.weight.copy_(torch.empty(module.weight.shape).normal_(0.0, std, generator=generator))
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()

    def set_recompute(self, mode: str) -> None:
        """Activation recomputation: "full" keeps only each block's input for backward and runs the
        block's forward again there; "selective" does that for the attention core only; "none"."""
        self.recompute = mode
        for block in self.blocks:
            if isinstance(block, Block):
                block.attn.recompute_core = mode == "selective"

    def sequence_parallel_parameters(self) -> list[nn.Parameter]:
        """With sequence parallelism, the replicated parameters applied to this rank's part of the
        sequence only (LayerNorms, the biases added after a reduce-scatter): their gradients are
        partial and must be summed over the TP group."""
        if self.sequence_group is None:
            return []
        parameters: list[nn.Parameter] = []
        for block in self.blocks:
            if isinstance(block, Block):
                parameters += [*block.ln_1.parameters(), *block.ln_2.parameters()]
                parameters += [block.attn.proj.bias, block.mlp.proj.bias]
        if self.ln_f is not None:
            parameters += list(self.ln_f.parameters())
        return parameters

    def parameter_sharding(self) -> dict[str, Sharding]:
        return {"wte.weight": Sharding(pipeline_copy=True)} if self.holds_tied_copy else {}

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        hidden = self.drop(self.wte(idx) + self.wpe(positions))
        return hidden if self.sequence_group is None else scatter_to_sequence(hidden, self.sequence_group)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last hidden state; the output weight is the token embedding (tied)."""
        return self.lm_head(self.ln_f(hidden), self.wte.weight)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (vocabulary-parallel when the head is partitioned)."""
        return self.lm_head.loss(logits, targets)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.shape.block_size:
            raise ValueError(
                f"sequence of {idx.shape[1]} tokens is longer than block_size {self.shape.block_size}"
            )
        return self.forward_stage(idx, first=True, last=True)

    def forward_stage(self, inputs: torch.Tensor, first: bool, last: bool) -> torch.Tensor:
        """This stage's part of the forward: ids -> hidden (first), hidden -> hidden, -> logits (last)."""
        hidden = self.embed(inputs) if first else inputs
        recompute = self.recompute == "full" and torch.is_grad_enabled()
        for index in self.stage_layers:
            block = self.blocks[index]
            hidden = checkpoint(block, hidden, use_reentrant=False) if recompute else block(hidden)
        return self.head(hidden) if last else hidden

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def flops_per_token(shape: GPTShape, n_params: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·d·T."""
    return 6 * n_params + 12 * shape.n_layer * shape.n_embd * shape.block_size
