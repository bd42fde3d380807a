"""What a model family is: one object per architecture that owns everything the rest of hpcllm needs
to know about it, so that partitioning, the planner, memory formulas, MFU, checkpoints and the
Hugging Face interop read one place (see docs/design.md, "Adding a model family").

A family implements:

- `presets` and `check(model, tp)`: its named shapes, and what a shape must satisfy (heads divide
  by tp, ...), as one-line `UsageError`s;
- `shape(model, vocab_size)`: the frozen shape the model, the planner and the formulas read;
- the arithmetic: `parameters` (embedding, per layer, head), `layer_forward_flops`,
  `activation_bytes_per_layer` (Korthikanti et al. for each recompute / sequence-parallel mode); the
  generic `flops_per_token`, `iteration_flops` and `plan_stages` are built on them here;
- how it is cut: `tensor_parallel_plan` (module name -> `TensorSplit`, as data) and
  `sequence_parallel_modules` (the replicated modules applied to a rank's part of the sequence);
- `build(shape, seed, layers, first, last)`: this pipeline stage of the model, seeded;
- `hf()`: its Hugging Face adapter module (config.json <-> shape, tensor names both ways).

Nothing here imports torch: the planner and the command line use the arithmetic without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from hpcllm.parallel.pipeline.partition import StagePlan, balanced_stages, parse_stage_layers

COLUMN, ROW, VOCAB, TIED_HEAD, VOCAB_HEAD = "column", "row", "vocab", "tied_head", "vocab_head"


def model_setting(key: str, value: Any) -> str:
    """`model.KEY=VALUE` as `--set` takes it (booleans as YAML's true/false)."""
    shown = str(value).lower() if isinstance(value, bool) else value
    return f"model.{key}={shown}"


@dataclass(frozen=True)
class TensorSplit:
    """How tensor parallelism cuts one module: `column` (output features), `row` (input features,
    summed after), `vocab` (an embedding's rows), `tied_head` (logits through the vocab-split
    embedding, and the vocabulary-parallel loss), `vocab_head` (an untied output head, its rows split
    by vocabulary like the embedding's, and the same loss). `blocks`: for a fused column layer, the sizes of
    the blocks stacked in its output (q, k, v; unequal with grouped-query attention), each split
    alike so that every rank gets whole heads."""

    kind: str
    blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class ParameterCounts:
    embedding: int  # on the first stage: token (and position) embeddings
    per_layer: int  # one transformer block
    head: int  # on the last stage: the final norm, and the output head when it is not tied
    n_layer: int
    tied_head: int  # the tied head's weight, held a second time by the last stage when pp > 1

    @property
    def total(self) -> int:
        return self.embedding + self.n_layer * self.per_layer + self.head


class ModelFamily(ABC):
    name: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]]
    hf_model_type: ClassVar[str]  # config.json's model_type of its Hugging Face folders
    # The vocabulary `plan --model PRESET` assumes: the family's published tokenizer's (padded to a
    # multiple of 64 where the published models pad it).
    published_vocab: ClassVar[int]
    norm_saved_tensors: ClassVar[int] = 2  # of [s, b, h] a norm keeps for backward (LayerNorm: in, out)

    @abstractmethod
    def shape(self, model: Any, vocab_size: int) -> Any:
        """The model's shape from its `model.` config section and the tokenizer's vocabulary."""

    @abstractmethod
    def check(self, model: Any, tp: int) -> None:
        """Refuse, in one line, a shape this family cannot build or cut over `tp` ranks."""

    @abstractmethod
    def parameters(self, shape: Any) -> ParameterCounts: ...

    @abstractmethod
    def layer_forward_flops(self, shape: Any, micro_batch: int) -> float:
        """FLOPs of one block's forward over one micro-batch of full sequences."""

    @abstractmethod
    def activation_bytes_per_layer(
        self,
        shape: Any,
        micro_batch: int,
        tp: int,
        recompute: str,
        sequence_parallel: bool,
        element_bytes: int,
    ) -> float:
        """Bytes one block keeps for backward per micro-batch and rank."""

    @abstractmethod
    def tensor_parallel_plan(self, shape: Any) -> dict[str, TensorSplit]:
        """Module names (inside a block, or of the whole model) -> how tensor parallelism cuts them;
        a module not named is replicated."""

    @abstractmethod
    def sequence_parallel_modules(self) -> tuple[str, ...]:
        """Names (inside a block, or of the whole model) of the replicated modules that, with sequence
        parallelism, see only this rank's part of the sequence: their gradients are summed over TP."""

    @abstractmethod
    def build(self, shape: Any, seed: int | None, layers: range | None, first: bool, last: bool) -> Any:
        """This pipeline stage of the model (all of it by default), initialised from `seed`."""

    @abstractmethod
    def hf(self) -> Any:
        """The Hugging Face adapter module (imported on demand: it needs torch and safetensors)."""

    # ---- built on the above, the same for every family -----------------------------------------

    def flops_per_token(self, shape: Any) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·H·Q·T (H heads of
        width Q: n_embd unless a family's heads are wider or narrower)."""
        n = self.parameters(shape).total
        return 6 * n + 12 * shape.n_layer * shape.n_head * shape.head_dim * shape.block_size

    def iteration_flops(self, shape: Any, global_batch: int, recompute: bool) -> float:
        """Narayanan et al. 2021, Eq. 3: three forwards' worth per layer (four with the recomputed
        forward) plus the logits' forward and backward."""
        layers = 4 if recompute else 3
        per_sequence = self.layer_forward_flops(shape, 1) * shape.n_layer * layers
        head = 6 * shape.block_size * shape.n_embd * shape.vocab_size
        return global_batch * (per_sequence + head)

    def predicted_activation_bytes(
        self, shape: Any, micro_batch: int, recompute: str, tp: int = 1, sequence_parallel: bool = False
    ) -> int | None:
        """Activation bytes of one micro-batch per rank in fp32, by Korthikanti et al. 2022's method
        applied to this implementation (None with dropout, whose masks and the unfused attention it
        needs are not modelled): the layers' share from `activation_bytes_per_layer`, and outside
        them the logits and their log-softmax (4*sbv/t, the head is vocabulary-parallel), the final
        norm's tensors (4*sbh each, `norm_saved_tensors` of them: input and output for LayerNorm;
        /t with sequence parallelism) and the token ids (24*sb).
        `hpcllm bench memory` measures against it."""
        if shape.dropout:
            return None
        s, b, h, v = shape.block_size, micro_batch, shape.n_embd, shape.vocab_size
        per_layer = self.activation_bytes_per_layer(shape, b, tp, recompute, sequence_parallel, 4)
        split = tp if sequence_parallel else 1  # the regions outside the TP layers
        outside = 4 * s * b * v / tp + 4 * self.norm_saved_tensors * s * b * h / split + 24 * s * b
        return int(shape.n_layer * per_layer + outside)

    def plan_stages(self, shape: Any, pp: int, stage_layers: str = "") -> StagePlan:
        """Layers per pipeline stage: as `stage_layers` says, or balanced by parameters (the
        embeddings count on the first stage, the head, tied or not, on the last)."""
        if stage_layers:
            return StagePlan(parse_stage_layers(stage_layers, shape.n_layer, pp))
        counts = self.parameters(shape)
        last = counts.head + counts.tied_head
        return StagePlan(balanced_stages([counts.per_layer] * shape.n_layer, counts.embedding, last, pp))
