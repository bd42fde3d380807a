"""A model of one training step, per rank: its time and its memory, term by term.

Time (seconds per step, on the slowest rank of the critical path):
    compute       FLOPs of the rank's share of a micro-batch (attention included: 24bsh^2(1 + s/6h)
                  per layer forward, 2bshV for the logits; backward twice the forward; recomputation
                  adds a forward of the layers, or of the attention core for `selective`), at the
                  rate the cluster sustains at this hidden size
    tp            per layer and micro-batch, 2 allreduces forward and 2 backward of b*s*h bf16
                  elements over the TP group (2 more with full recomputation); with sequence
                  parallelism an all-gather plus a reduce-scatter each, the same bytes
    bubble        the pipeline's idle share: (p - 1)/(m + p - 1) of the step
    dp            ring allreduce of the rank's gradients over DP (2(n-1)/n of the bytes; reduce-
                  scatter alone at zero = 2), across nodes when the DP group spans them, of which
                  `dp_overlap` hides behind backward
    zero          zero >= 1: the all-gather of the updated parameters ((n-1)/n of the bytes)
Memory (bytes per rank): weights, gradients and optimizer state as hpcllm holds them (fp32
weights and gradients, two fp32 Adam moments: 16 bytes per parameter, sharded by ZeRO), and
activations after Korthikanti et al. 2022 for 16-bit activations: s*b*h*(34 + 5*a*s/h) per layer,
split by tp, sequence parallelism and recomputation as the paper shows, for the micro-batches a
stage holds at once (1F1B: p on the first stage, so l layers' worth; GPipe: all m).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hpcllm.planner.profiles import ClusterProfile

GIB = 1024**3
BF16 = 2  # bytes of an activation on the wire and in memory
MEMORY_HEADROOM = 0.9  # the allocator's fragmentation and the CUDA context


@dataclass(frozen=True)
class ModelSpec:
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab: int

    @property
    def parameters(self) -> int:
        h, layer = self.n_embd, 12 * self.n_embd**2 + 13 * self.n_embd
        return self.n_layer * layer + (self.vocab + self.block_size) * h + 2 * h


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    zero: int = 0
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = False
    schedule: str = "1f1b"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class Prediction:
    layout: Layout
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


def _ring_seconds(nbytes: float, ranks: int, gbps: float, latency_us: float, efficiency: float) -> float:
    """A ring allreduce of `nbytes` over `ranks`: 2(n-1)/n of the bytes at the link rate, 2(n-1) steps."""
    if ranks == 1:
        return 0.0
    steps = 2 * (ranks - 1)
    return steps / ranks * nbytes / (gbps * 1e9 * efficiency) + steps * latency_us * 1e-6


def layer_forward_flops(model: ModelSpec, micro_batch: int) -> float:
    s, h = model.block_size, model.n_embd
    return 24 * micro_batch * s * h * h * (1 + s / (6 * h))


def iteration_flops(model: ModelSpec, global_batch: int, recompute: bool) -> float:
    """Narayanan et al. 2021, Eq. 3 (with recomputation) and its 72-coefficient form (without)."""
    b, s, layers, h, v = global_batch, model.block_size, model.n_layer, model.n_embd, model.vocab
    coefficient = 96 if recompute else 72  # forward once, backward twice (+ the recomputed forward)
    return coefficient * b * s * layers * h * h * (1 + s / (6 * h)) + 6 * b * s * h * v


def activation_bytes_per_layer(model: ModelSpec, layout: Layout) -> float:
    """Korthikanti et al. 2022 (Table 2), 16-bit activations, per layer and micro-batch."""
    s, b, h, a, t = model.block_size, layout.micro_batch, model.n_embd, model.n_head, layout.tp
    sbh = s * b * h
    if layout.recompute == "full":
        return 2 * sbh / (t if layout.sequence_parallel else 1)
    attention_core = 0 if layout.recompute == "selective" else 5 * a * s / (h * t)
    if layout.sequence_parallel:
        return sbh * (34 / t + attention_core)
    return sbh * (10 + 24 / t + attention_core)


def predict(model: ModelSpec, layout: Layout, cluster: ClusterProfile, global_batch: int) -> Prediction:
    t, p, d, b = layout.tp, layout.pp, layout.dp, layout.micro_batch
    s, h, v, layers = model.block_size, model.n_embd, model.vocab, model.n_layer
    m = global_batch // (d * b)  # micro-batches per pipeline per step
    layers_per_stage = layers / p
    rate = cluster.sustained_flops(h)

    # ---- compute: one micro-batch on one rank, forward + backward (+ recomputation) ----------
    layer = layer_forward_flops(model, b)
    recomputed = {"full": layer, "selective": 4 * b * s * s * h, "none": 0.0}[layout.recompute]
    per_micro = (layers_per_stage * (3 * layer + recomputed) + 3 * 2 * b * s * h * v / p) / t
    compute = m * per_micro / rate

    # ---- tensor parallelism: inside a node when it fits -----------------------------------
    tp_gbps, tp_latency = (
        (cluster.intra_node_gbps, cluster.intra_node_latency_us)
        if t <= cluster.gpus_per_node
        else (cluster.inter_node_gbps, cluster.inter_node_latency_us)
    )
    collectives = 4 + (2 if layout.recompute == "full" else 0)
    one = _ring_seconds(b * s * h * BF16, t, tp_gbps, tp_latency, cluster.collective_efficiency)
    tp = m * layers_per_stage * collectives * one

    # ---- pipeline: activations between stages, and the bubble ------------------------------
    p2p = 0.0
    if p > 1:
        p2p = 2 * m * (b * s * h * BF16 / t) / (cluster.inter_node_gbps * 1e9 * cluster.collective_efficiency)
    busy = compute + tp + p2p
    bubble = busy * (p - 1) / m if p > 1 else 0.0

    # ---- data parallelism (and ZeRO's gather) ----------------------------------------------
    rank_parameters = model.parameters / (t * p)
    ranks_per_node = cluster.gpus_per_node
    dp_inside_node = t * p * d <= ranks_per_node
    dp_gbps, dp_latency = (
        (cluster.intra_node_gbps, cluster.intra_node_latency_us)
        if dp_inside_node
        else (cluster.inter_node_gbps, cluster.inter_node_latency_us)
    )
    gradient_bytes = rank_parameters * 4  # fp32 gradients
    reduction = _ring_seconds(gradient_bytes, d, dp_gbps, dp_latency, cluster.collective_efficiency)
    if layout.zero == 2:
        reduction /= 2  # a reduce-scatter is half an allreduce
    dp = reduction * (1 - cluster.dp_overlap)
    zero = reduction / 2 if layout.zero else 0.0  # the all-gather of the updated parameters

    step = busy + bubble + dp + zero
    tokens = global_batch * s

    # ---- memory per rank ---------------------------------------------------------------------
    states_per_parameter = {0: 16.0, 1: 8 + 8 / d, 2: 8 + 12 / d}[layout.zero]
    states = rank_parameters * states_per_parameter
    in_flight = min(p, m) if layout.schedule == "1f1b" else m
    activations = activation_bytes_per_layer(model, layout) * layers_per_stage * in_flight
    logits = 4 * b * s * v / t  # fp32 logits and their softmax on the last stage
    total = states + activations + logits
    fits = total <= cluster.memory_gib * GIB * MEMORY_HEADROOM

    gpus = layout.gpus
    recompute_flops = iteration_flops(model, global_batch, recompute=layout.recompute == "full")
    model_flops = iteration_flops(model, global_batch, recompute=False)
    return Prediction(
        layout=layout,
        step_s=step,
        tokens_per_s=tokens / step,
        tflops_per_gpu=recompute_flops / step / gpus,
        mfu=model_flops / step / gpus / cluster.peak_flops,
        memory_gib_per_rank=total / GIB,
        fits=fits,
        breakdown={
            "compute_s": compute,
            "tp_s": tp,
            "pp_p2p_s": p2p,
            "bubble_s": bubble,
            "dp_exposed_s": dp,
            "zero_gather_s": zero,
            "states_gib": states / GIB,
            "activations_gib": activations / GIB,
            "logits_gib": logits / GIB,
        },
    )
