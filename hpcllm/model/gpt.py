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
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hpcllm.batch import IGNORE
from hpcllm.model.dropout import (
    EMBEDDING,
    DropoutKeys,
    dropout,
)
from hpcllm.model.gpt2_shape import GPTShape
from hpcllm.model.gpt_block import MLP, Block, CausalSelfAttention, run
from hpcllm.model.heads import TiedHead, UntiedHead, chunked_loss_sum
from hpcllm.model.kv_cache import KVCache
from hpcllm.model.rope import Rotary
from hpcllm.model.unit_gate import NO_GATE
from hpcllm.parallel.sharding import Sharding, sequence_parallel_parameters
from hpcllm.parallel.tensor.collectives import TensorCollectives
from hpcllm.parallel.tensor.mappings import scatter_to_sequence


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
        self.loss_chunk = 0  # train.loss_chunk: see sequence_loss_sum
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

    def enable_context_parallel(self, ring: Any, positions: torch.Tensor) -> None:
        """Context parallelism: this rank holds `positions` of every sequence (the inputs it is
        given are those), and attention reaches the other CP ranks' keys by `ring` (a transport of
        parallel.context.transport, or the CP group's mpi4py communicator)."""
        for block in self.blocks:
            if not isinstance(block, nn.Identity):
                block.attn.context = (ring, positions)

    def context_positions(self) -> torch.Tensor | None:
        """The positions of every sequence this rank holds with context parallelism, else None."""
        held = [b.attn.context[1] for b in self.blocks if not isinstance(b, nn.Identity) and b.attn.context]
        return held[0] if held else None

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

    def sequence_loss_sum(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        first: bool = True,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        keys: DropoutKeys | None = None,
    ) -> torch.Tensor:
        """The loss sum of this stage's inputs (the last stage: the model's whole forward when
        `first`). With `loss_chunk` = N in training, the head and the loss run N tokens at a time and
        each chunk's logits are recomputed in backward: they never exist whole (chunked_loss_sum)."""
        if not self.loss_chunk or not torch.is_grad_enabled():
            logits = self.forward_stage(inputs, first, True, positions, mask=mask, keys=keys)
            return self.loss_sum(logits, targets)
        hidden = self.forward_stage(inputs, first, False, positions, mask=mask, keys=keys)
        self.gate.before(*self._head_units())
        tied = self.wte.weight if self.shape.tie_embeddings else None
        total = chunked_loss_sum(self.lm_head, run(self.ln_f, hidden), targets, tied, self.loss_chunk)
        return self.gate.after(total, *self._head_units())

    def _head_units(self) -> tuple[str, ...]:
        """The units the head uses (fully sharded parameters): its own, and a tied embedding."""
        return ("head", "embedding") if self.shape.tie_embeddings else ("head",)

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
        gate.before(*self._head_units())
        return gate.after(self.head(hidden), *self._head_units())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
