"""A model of one training step, per rank: its time and its memory, term by term.

Time (seconds per step, on the slowest rank of the critical path):
    compute       FLOPs of the rank's share of a micro-batch (attention included: 24bsh^2(1 + s/6h)
                  per layer forward, 2bshV for the logits; backward twice the forward; recomputation
                  adds a forward of the layers, or of the attention core for `selective`), at the
                  rate the cluster sustains at this hidden size and (GPUs) tokens per micro-batch,
                  plus fixed costs per layer and per micro-batch (kernel launches, embedding, loss)
    tp            per layer and micro-batch, 2 allreduces forward and 2 backward of b*s*h bf16
                  elements over the TP group (2 more with full recomputation); with sequence
                  parallelism an all-gather plus a reduce-scatter each, the same bytes
    bubble        the pipeline's idle time: the slowest stage waits for one micro-batch of each
                  other stage, (m - 1) t_max + sum(t) in all (layers split as hpcllm splits them),
                  which is (p - 1)/(m + p - 1) of the step when the stages are equal
    dp            ring allreduce of the rank's gradients over DP (2(n-1)/n of the bytes; reduce-
                  scatter alone at zero = 2 and 3), across nodes when the DP group spans them, of
                  which `dp_overlap` hides behind backward (hpcllm.planner.sharding_model)
    zero          zero 1, 2: the all-gather of the updated parameters ((n-1)/n of the bytes); zero 3:
                  two all-gathers of the weights per micro-batch, `dp_overlap` of them prefetched
    optimizer     AdamW's 28 bytes per updated parameter through `memory_gbps`
On a CPU node the ranks share the cores, and the profile's fixed costs and `step_scale` apply
(profiles.ClusterProfile says what each is; `plan calibrate` measures them).
Memory (bytes per rank): weights, gradients and optimizer state as hpcllm holds them (fp32
weights and gradients, two fp32 Adam moments: 16 bytes per parameter, sharded by ZeRO as
hpcllm.planner.sharding_model counts), and
activations after Korthikanti et al. 2022 for 16-bit activations: s*b*h*(34 + 5*a*s/h) per layer,
split by tp, sequence parallelism and recomputation as the paper shows, for the micro-batches a
stage holds at once (1F1B: p - i on stage i; GPipe: all m), on the fullest stage.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

from hpcllm.errors import UsageError
from hpcllm.model.family import ModelFamily, ParameterCounts, model_setting
from hpcllm.model.llama_shape import LLAMA_KEYS
from hpcllm.model.registry import PRESETS, family_named
from hpcllm.planner.links import context_ring_seconds, link, ring_seconds
from hpcllm.planner.profiles import ClusterProfile
from hpcllm.planner.sharding_model import data_parallel_seconds, shard_ranks, state_bytes

GIB = 1024**3
MEMORY_HEADROOM = 0.9  # the allocator's fragmentation and the CUDA context


@dataclass(frozen=True)
class ModelSpec:
    """The model a prediction is for: its family's shape, and every count and formula from the
    family (hpcllm.model.family), never a copy."""

    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab: int
    family: str = "gpt2"
    settings: tuple[tuple[str, Any], ...] = ()  # the family's other `model.` keys (Llama's n_kv_head, ...)

    @classmethod
    def of_model(cls, model: Any, vocab: int) -> ModelSpec:
        """From a `model.` config section (or any object with its keys: a preset's, say)."""
        shape_keys = ("n_layer", "n_embd", "n_head", "block_size")
        left_out = (*shape_keys, "family", "preset", "dropout")
        settings = tuple(sorted((k, v) for k, v in vars(model).items() if k not in left_out))
        family = getattr(model, "family", "gpt2")
        return cls(*(getattr(model, key) for key in shape_keys), vocab, family, settings)

    @classmethod
    def of_preset(cls, name: str, vocab: int | None = None) -> ModelSpec:
        """A preset's model; `vocab` by default its family's published tokenizer's."""
        family, keys = PRESETS[name]
        vocab = vocab if vocab is not None else family_named(family).published_vocab
        return cls.of_model(SimpleNamespace(family=family, **keys), vocab)

    def _section(self) -> SimpleNamespace:
        """The model as a `model.` config section the family reads."""
        section = {key: getattr(self, key) for key in ("n_layer", "n_embd", "n_head", "block_size")}
        return SimpleNamespace(**section, **dict(self.settings), dropout=0.0)

    @property
    def shape(self) -> Any:
        return self.model_family.shape(self._section(), self.vocab)

    def cuts_over(self, tp: int) -> bool:
        """Whether the family can split the model over `tp` tensor-parallel ranks (heads, key/value
        heads and the MLP's width divide by it)."""
        try:
            self.model_family.check(self._section(), tp)
        except UsageError:
            return False
        return True

    def config_settings(self) -> list[str]:
        """`model.KEY=VALUE` assignments that train this model (the vocabulary comes from the data)."""
        section = vars(self._section())
        keys = ["n_layer", "n_embd", "n_head", "block_size"]
        keys += [key for key, value in self.settings if LLAMA_KEYS.get(key, object()) != value]
        family = [] if self.family == "gpt2" else [f"model.family={self.family}"]
        return family + [model_setting(key, section[key]) for key in keys]

    @property
    def model_family(self) -> ModelFamily:
        return family_named(self.family)

    @property
    def counts(self) -> ParameterCounts:
        return self.model_family.parameters(self.shape)

    @property
    def block_parameters(self) -> int:
        return self.counts.per_layer

    @property
    def embedding_parameters(self) -> int:
        """On the first stage."""
        return self.counts.embedding

    @property
    def parameters(self) -> int:
        return self.counts.total


@dataclass(frozen=True)
class PlannedLayout:
    """A layout the planner predicts: the grid (hpcllm.parallel.layout.Layout) with the batch and
    memory settings that change its time and memory."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    zero: int = 0
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    shard_group: str = "world"  # zero = 3: world, or node (hybrid sharding)
    loss_chunk: int = 0  # train.loss_chunk: tokens of the head and its loss at a time (0: all)
    cp: int = 1  # context parallelism: each sequence split over cp ranks

    @property
    def replicas(self) -> int:
        """The ranks gradients are reduced over: dp × cp."""
        return self.dp * self.cp

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp


@dataclass(frozen=True)
class Prediction:
    layout: PlannedLayout
    step_s: float
    tokens_per_s: float
    tflops_per_gpu: float  # counts the recomputed forward (the convention of Narayanan et al., Eq. 3)
    mfu: float  # never counts recomputation
    memory_gib_per_rank: float
    fits: bool
    breakdown: dict[str, float]  # seconds per step by term, then GiB per rank by kind

    def row(self) -> dict[str, Any]:
        return {
            **asdict(self.layout),
            "fits": self.fits,
            "memory_gib_per_rank": round(self.memory_gib_per_rank, 3),
            "step_s": self.step_s,
            "tokens_per_s": self.tokens_per_s,
            "tflops_per_gpu": self.tflops_per_gpu / 1e12,
            "mfu": self.mfu,
            "breakdown": self.breakdown,
        }


def layer_forward_flops(model: ModelSpec, micro_batch: int) -> float:
    return model.model_family.layer_forward_flops(model.shape, micro_batch)


def iteration_flops(model: ModelSpec, global_batch: int, recompute: bool) -> float:
    """Narayanan et al. 2021, Eq. 3 (with recomputation) and its 72-coefficient form (without)."""
    return model.model_family.iteration_flops(model.shape, global_batch, recompute)


def activation_bytes_per_layer(model: ModelSpec, layout: PlannedLayout, element_bytes: int = 2) -> float:
    """Bytes one layer keeps for backward per micro-batch and rank (the family's formula)."""
    return model.model_family.activation_bytes_per_layer(
        model.shape, layout.micro_batch, layout.tp, layout.recompute, layout.sequence_parallel, element_bytes
    )


def _cpu_share(cluster: ClusterProfile, ranks_per_node: int) -> tuple[float, float]:
    """(share of the node's rate a rank computes at, slowdown from time-sharing) on a CPU node.

    Each rank runs cores // ranks threads (one at least); a rank with several threads gets less
    than that many cores' worth (`thread_efficiency`). With more ranks than cores they take turns:
    every rank runs at cores / ranks of its speed, less what switching between them costs
    (`oversubscribed_efficiency` per doubling of ranks over cores). GPUs: (1, 1).
    """
    if not cluster.cores_per_node:
        return 1.0, 1.0
    cores = cluster.cores_per_node
    threads = max(1, cores // ranks_per_node)
    share = threads / cores * (cluster.thread_efficiency if threads > 1 else 1.0)
    crowding = ranks_per_node * threads / cores
    if crowding <= 1:
        return share, 1.0
    return share, crowding / cluster.oversubscribed_efficiency ** math.log2(crowding)


@functools.lru_cache(maxsize=256)
def stage_layers(model: ModelSpec, pp: int) -> tuple[int, ...]:
    """Layers per pipeline stage as hpcllm assigns them (the family's `plan_stages`)."""
    if pp == 1:
        return (model.n_layer,)
    return tuple(model.model_family.plan_stages(model.shape, pp).layers_per_stage)


def _stage_parameters(model: ModelSpec, stage: int, layers: int, pp: int) -> float:
    """Parameters a stage holds: its layers, the embeddings on the first, the head on the last
    (with a copy of a tied head's weight when pp > 1)."""
    counts = model.counts
    held = layers * counts.per_layer
    if stage == 0:
        held += counts.embedding
    if stage == pp - 1:
        held += counts.head + (counts.tied_head if pp > 1 else 0)
    return held


def _stage_costs(
    model: ModelSpec, layout: PlannedLayout, cluster: ClusterProfile, share: float, ranks_per_node: int
) -> tuple[list[tuple[float, float]], float]:
    """Per stage, (compute, TP communication) seconds of one micro-batch's forward + backward, and
    the seconds of one micro-batch's activations crossing between two stages."""
    t, p, b, c = layout.tp, layout.pp, layout.micro_batch, layout.cp
    s, h, v = model.block_size, model.n_embd, model.vocab
    rate = cluster.sustained_flops(h, b * s // c) * share
    # ---- compute: one micro-batch on one rank, forward + backward (+ recomputation) ----------
    layer = layer_forward_flops(model, b)
    attention_core = 4 * b * s * s * model.shape.n_head * model.shape.head_dim  # scores, weighted sum
    recomputed = {"full": layer, "selective": attention_core, "none": 0.0}[layout.recompute]
    layer_s = (3 * layer + recomputed) / t / c / rate + cluster.layer_overhead_us * 1e-6
    # The vocabulary projection and the loss, on the last stage, with the fixed cost of a micro-batch;
    # the projection is one GEMM as wide as the vocabulary, so it runs at the large-GEMM rate.
    head_rate = cluster.large_gemm_flops * share * cluster.head_efficiency
    head_s = 3 * 2 * b * s * h * v / t / c / head_rate + cluster.micro_batch_overhead_us * 1e-6
    # ---- tensor parallelism: inside a node when it fits -----------------------------------
    tp_gbps, tp_latency = link(cluster, t <= ranks_per_node)
    collectives = 4 + (2 if layout.recompute == "full" else 0)
    one = ring_seconds(
        b * s / c * h * cluster.activation_bytes, t, tp_gbps, tp_latency, cluster.collective_efficiency
    )
    if t > 1:
        one += cluster.tp_collective_us * 1e-6  # the ranks meet: what waiting for each other costs
    kv_width = getattr(model.shape, "kv_width", h)
    ring = context_ring_seconds(c, t, b * s * kv_width * cluster.activation_bytes, cluster, ranks_per_node)
    # ---- pipeline: activations between stages ------------------------------------------------
    p2p_micro = 0.0
    if p > 1:
        p2p_gbps, p2p_latency = link(cluster, t * p <= ranks_per_node)
        nbytes = b * s * h * cluster.activation_bytes / t / c
        p2p_micro = 2 * (nbytes / (p2p_gbps * 1e9 * cluster.collective_efficiency) + p2p_latency * 1e-6)
        p2p_micro += cluster.pp_micro_batch_us * 1e-6  # the schedule's own cost per micro-batch
    stages = stage_layers(model, p)
    per_stage = [
        (n * layer_s + (head_s if i == p - 1 else 0.0), n * (collectives * one + ring))
        for i, n in enumerate(stages)
    ]
    return per_stage, p2p_micro


def _pipeline_seconds(
    per_stage: list[tuple[float, float]], p2p_micro: float, m: int, slowdown: float, fill: float
) -> tuple[float, float, float, float]:
    """(compute, tp, p2p, bubble) seconds of a step: the pipeline moves at the pace of its slowest
    stage (hpcllm balances them by parameters)."""
    p = len(per_stage)
    # CPU ranks outnumbering the cores: a waiting stage's turn on the cores partly goes to the
    # others (`bubble_fill`), which evens out the stages and fills part of the bubble.
    if fill:
        means = [statistics.fmean(part) for part in zip(*per_stage, strict=True)]
        per_stage = [
            tuple(fill * mean + (1 - fill) * x for mean, x in zip(means, stage, strict=True))
            for stage in per_stage
        ]
    compute_micro, tp_micro = max(per_stage, key=sum)
    compute, tp, p2p = (m * slowdown * x for x in (compute_micro, tp_micro, p2p_micro))
    # The slowest stage idles while the first micro-batch reaches it and the last one's backward
    # drains from it: one micro-batch of every other stage, (m - 1) t_max + sum(t) in all, which is
    # (p - 1)/(m + p - 1) of the step when the stages are equal.
    others = sum(map(sum, per_stage)) - compute_micro - tp_micro + (p - 1) * p2p_micro
    return compute, tp, p2p, max(0.0, slowdown * others * (1 - fill))  # not -0.0 from rounding


def _memory_per_rank(
    model: ModelSpec,
    layout: PlannedLayout,
    cluster: ClusterProfile,
    stage_parameters: list[float],
    m: int,
    ranks_per_node: int,
) -> tuple[float, float, float]:
    """(states, activations, logits) bytes on the fullest stage's ranks."""
    t, p, d, b, c = layout.tp, layout.pp, layout.replicas, layout.micro_batch, layout.cp
    s = shard_ranks(layout.zero, layout.shard_group, d, t, ranks_per_node)
    per_layer = activation_bytes_per_layer(model, layout, cluster.activation_bytes) / c
    logits = 4 * b * model.block_size * model.vocab / t / c  # fp32 logits and their softmax, last stage
    if layout.loss_chunk:  # one chunk's logits (their gradient in place) and the head weight's gradient
        logits = 4 * (min(b * model.block_size // c, layout.loss_chunk) + model.n_embd) * model.vocab / t
    block = model.block_parameters / t
    memory = []
    for i, n in enumerate(stage_layers(model, p)):
        in_flight = min(p - i, m) if layout.schedule == "1f1b" else m  # 1F1B: stage i holds p - i
        outside = (stage_parameters[i] - n * model.block_parameters) / t  # embedding, head
        whole = outside + min(n, 2) * block
        memory.append(
            (
                state_bytes(layout.zero, stage_parameters[i] / t, whole, block, s),
                per_layer * n * in_flight,
                logits if i == p - 1 else 0.0,
            )
        )
    return max(memory, key=sum)


def predict(
    model: ModelSpec,
    layout: PlannedLayout,
    cluster: ClusterProfile,
    global_batch: int,
    ranks_per_node: int | None = None,
) -> Prediction:
    """The step time and memory per rank of `layout`; `ranks_per_node` defaults to the profile's
    GPUs per node (on a CPU node: how many ranks share its cores)."""
    ranks_per_node = min(ranks_per_node or cluster.gpus_per_node, layout.gpus)
    m = global_batch // (layout.dp * layout.micro_batch)  # micro-batches per pipeline per step
    share, slowdown = _cpu_share(cluster, ranks_per_node)
    per_stage, p2p_micro = _stage_costs(model, layout, cluster, share, ranks_per_node)
    fill = cluster.bubble_fill if slowdown > 1 else 0.0
    compute, tp, p2p, bubble = _pipeline_seconds(per_stage, p2p_micro, m, slowdown, fill)
    stages = stage_layers(model, layout.pp)
    stage_parameters = [_stage_parameters(model, i, n, layout.pp) for i, n in enumerate(stages)]
    rank_parameters = max(stage_parameters) / layout.tp
    dp, zero, optimizer = data_parallel_seconds(
        (layout.zero, layout.shard_group, layout.tp, layout.pp, layout.replicas),
        cluster,
        ranks_per_node,
        rank_parameters,
        slowdown,
        m,
    )
    # What the benchmarks miss of a real training step (the loop, data, hooks), measured once.
    seconds = {
        "compute_s": compute,
        "tp_s": tp,
        "pp_p2p_s": p2p,
        "bubble_s": bubble,
        "dp_exposed_s": dp,
        "zero_gather_s": zero,
        "optimizer_s": optimizer,
    }
    seconds = {name: x * cluster.step_scale for name, x in seconds.items()}
    step = sum(seconds.values())
    states, activations, logits = _memory_per_rank(
        model, layout, cluster, stage_parameters, m, ranks_per_node
    )
    total = states + activations + logits
    gpus = layout.gpus
    recompute_flops = iteration_flops(model, global_batch, recompute=layout.recompute == "full")
    model_flops = iteration_flops(model, global_batch, recompute=False)
    return Prediction(
        layout=layout,
        step_s=step,
        tokens_per_s=global_batch * model.block_size / step,
        tflops_per_gpu=recompute_flops / step / gpus,
        mfu=model_flops / step / gpus / cluster.peak_flops,
        memory_gib_per_rank=total / GIB,
        fits=total <= cluster.memory_gib * GIB * MEMORY_HEADROOM,
        breakdown=seconds
        | {"states_gib": states / GIB, "activations_gib": activations / GIB, "logits_gib": logits / GIB},
    )
