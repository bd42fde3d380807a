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
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hpcllm.batch import IGNORE
from hpcllm.model.dropout import (
    ATTENTION,
    ATTENTION_OUT,
    EMBEDDING,
    MLP_OUT,
    DropoutKeys,
    block_site,
    dropout,
    keyed_dropout,
)
from hpcllm.model.gpt2_shape import GPTShape
from hpcllm.model.heads import TiedHead, UntiedHead
from hpcllm.model.kv_cache import KVCache
from hpcllm.model.rope import Rotary
from hpcllm.model.unit_gate import NO_GATE
from hpcllm.parallel.sharding import Sharding, sequence_parallel_parameters
from hpcllm.parallel.tensor.collectives import TensorCollectives
from hpcllm.parallel.tensor.mappings import scatter_to_sequence


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape, index: int):
        super().__init__()
        self.index = index  # the block's global index: its slot in a KV cache
        self.head_dim = shape.head_dim
        self.dropout = shape.dropout
        self.qkv = nn.Linear(shape.n_embd, 3 * shape.n_embd)
        self.proj = nn.Linear(shape.n_embd, shape.n_embd)
        self.recompute_core = False  # selective recomputation: keep only q, k, v for backward

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
        elif self.training and self.dropout:
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
        tied = shape.tie_embeddings
        self.wte: nn.Module | None = (
            nn.Embedding(shape.vocab_size, shape.n_embd) if first or (last and tied) else None
        )
        self.wpe: nn.Embedding | None = self._position_embedding() if first else None
        # Blocks keep their global index in parameter names, so checkpoints of any pipeline size
        # name a tensor alike.
        self.blocks = nn.ModuleList(
            self._block(index) if index in layers else nn.Identity() for index in range(shape.n_layer)
        )
        self.ln_f: nn.Module | None = self._norm() if last else None
        # The head on the last stage only: through the token embedding, or with its own weight.
        self.lm_head: nn.Module | None = None
        if last:
            self.lm_head = TiedHead() if tied else UntiedHead(shape.n_embd, shape.vocab_size)
        self.stage_layers = layers  # the blocks this model runs
        self.holds_tied_copy = tied and last and not first  # of the embedding the first stage owns
        self.recompute = "none"  # see set_recompute
        # Sequence parallelism: the residual stream holds this TP rank's part of the sequence, and
        # these modules (the family's list) see only that part.
        self.sequence_group: TensorCollectives | None = None
        self.sequence_parallel_modules: tuple[str, ...] = ()
        self.gate = NO_GATE  # fully sharded parameters: see shard_units
        self._init_weights(int(torch.randint(2**62, ()).item()) if seed is None else seed)

    # ---- what a family changes (hpcllm.model.llama_net overrides these) -----------------------
    def _position_embedding(self) -> nn.Embedding | None:
        """Learned positions, added to the token embedding."""
        return nn.Embedding(self.shape.block_size, self.shape.n_embd)

    def _block(self, index: int) -> nn.Module:
        shape = self.shape
        return Block(self._norm(), CausalSelfAttention(shape, index), self._norm(), MLP(shape, index))

    def _norm(self) -> nn.Module:
        return nn.LayerNorm(self.shape.n_embd)

    def rotary(self, positions: torch.Tensor | None, hidden: torch.Tensor) -> Rotary | None:
        """The blocks' rotary positions for this forward: none, GPT-2's are learned."""
        return None

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
            if not isinstance(block, nn.Identity):
                block.attn.recompute_core = mode == "selective"

    def enable_sequence_parallel(self, group: TensorCollectives, modules: tuple[str, ...]) -> None:
        """Split the residual stream's sequence over `group`; `modules` (names inside a block, or of
        the whole model) are the replicated ones that then see a part of it."""
        self.sequence_group, self.sequence_parallel_modules = group, modules

    def parameter_sharding(self) -> dict[str, Sharding]:
        """The tied copy of the embedding on the last stage; with sequence parallelism, the
        parameters of the modules that see only this rank's part of the sequence (the family's
        list: the LayerNorms), whose gradients are partial over TP."""
        declared = {"wte.weight": Sharding(pipeline_copy=True)} if self.holds_tied_copy else {}
        if self.sequence_group is None:
            return declared
        partial = Sharding(sequence_parallel=True)
        kinds = ("weight", "bias")
        suffixes = tuple(f".{name}.{kind}" for name in self.sequence_parallel_modules for kind in kinds)
        for name, _ in self.named_parameters():
            if f".{name}".endswith(suffixes):
                declared[name] = partial
        return declared

    def sequence_parallel_parameters(self) -> list[nn.Parameter]:
        return sequence_parallel_parameters(self)

    def shard_units(self) -> list[tuple[str, list[nn.Module]]]:
        """The units whose parameters are gathered together when they are fully sharded, in the
        order the forward runs them; the token embedding is one alone, so that the tied copy on the
        last pipeline stage is laid out as on the first."""
        units: list[tuple[str, list[nn.Module]]] = []
        if self.wte is not None:
            units.append(("embedding", [self.wte]))
        if self.wpe is not None:
            units.append(("positions", [self.wpe]))
        units += [(f"block{index}", [self.blocks[index]]) for index in self.stage_layers]
        if self.ln_f is not None and self.lm_head is not None:
            units.append(("head", [self.ln_f, self.lm_head]))
        return units

    def embed(
        self, idx: torch.Tensor, positions: torch.Tensor | None = None, keys: DropoutKeys | None = None
    ) -> torch.Tensor:
        hidden = self.wte(idx)  # the whole sequence on every TP rank
        if self.wpe is not None:
            if positions is None:
                positions = torch.arange(idx.shape[1], device=idx.device)
            hidden = hidden + self.wpe(positions)
        if self.training and self.shape.dropout:
            hidden = dropout(hidden, self.shape.dropout, True, keys, EMBEDDING, (hidden.shape[2], 1))
        return hidden if self.sequence_group is None else scatter_to_sequence(hidden, self.sequence_group)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last hidden state, through the token embedding when the head is tied."""
        tied = self.wte.weight if self.shape.tie_embeddings else None
        return self.lm_head(run(self.ln_f, hidden), tied)

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The *sum* of next-token cross-entropies over the trained targets (not IGNORE), in fp32:
        a training step divides it by their count over the global batch (hpcllm.batch).
        Vocabulary-parallel when the head is partitioned."""
        return self.lm_head.loss_sum(logits, targets)

    def row_loss_sums(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[rows]: each row's loss sum (scoring choices: minus each ending's log-likelihood)."""
        return torch.stack([self.loss_sum(logits[r : r + 1], targets[r : r + 1]) for r in range(len(logits))])

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean over the trained targets of this batch alone."""
        return self.loss_sum(logits, targets) / (targets != IGNORE).sum().clamp(min=1)

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        keys: DropoutKeys | None = None,
    ) -> torch.Tensor:
        if idx.shape[1] > self.shape.block_size:
            raise ValueError(
                f"sequence of {idx.shape[1]} tokens is longer than block_size {self.shape.block_size}"
            )
        return self.forward_stage(idx, True, True, positions, cache, mask, keys)

    def forward_stage(
        self,
        inputs: torch.Tensor,
        first: bool,
        last: bool,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        keys: DropoutKeys | None = None,
    ) -> torch.Tensor:
        """This stage's part of the forward: ids -> hidden (first), hidden -> hidden, -> logits (last).
        Decoding passes the new positions' ids with their `positions`, the `cache` of the keys and
        values before them, and a `mask` when rows are padded (model.inference). Training passes
        the batch's dropout `keys` (model.dropout), and its positions and attention `mask` when
        documents are packed into a row (hpcllm.batch)."""
        if keys is not None:
            keys = replace(keys, sequence_parallel=self.sequence_group is not None)
        gate = self.gate
        if first:
            gate.before("embedding", "positions")
            hidden = gate.after(self.embed(inputs, positions, keys), "embedding", "positions")
        else:
            hidden = inputs
        rotary = self.rotary(positions, hidden)
        recompute = self.recompute == "full" and torch.is_grad_enabled()
        for index in self.stage_layers:
            block, unit = self.blocks[index], f"block{index}"
            gate.before(unit)
            if recompute:
                hidden = checkpoint(block, hidden, None, mask, keys, rotary, use_reentrant=False)
            else:
                hidden = (
                    block(hidden, cache, mask, keys, rotary)
                    if hidden.requires_grad
                    else block.forward(hidden, cache, mask, keys, rotary)
                )
            hidden = gate.after(hidden, unit)
        if not last:
            return hidden
        head_units = ("head", "embedding") if self.shape.tie_embeddings else ("head",)
        gate.before(*head_units)
        return gate.after(self.head(hidden), *head_units)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


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
