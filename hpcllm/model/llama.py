"""The Llama family (Llama 2/3, Mistral, Qwen2-style biases, SmolLM, TinyLlama): rotary positions,
RMSNorm, SwiGLU, grouped-query attention, optional biases, tied or untied embeddings. Its presets,
shape, arithmetic, tensor-parallel plan and Hugging Face adapter; the network is
`hpcllm.model.llama_net` (imported on demand: the arithmetic needs no torch)."""

from __future__ import annotations

from typing import Any

from hpcllm.errors import UsageError
from hpcllm.model.family import (
    COLUMN,
    ROW,
    TIED_HEAD,
    VOCAB,
    VOCAB_HEAD,
    ModelFamily,
    ParameterCounts,
    TensorSplit,
)
from hpcllm.model.llama_shape import LLAMA_KEYS, LlamaShape, parse_rope_scaling, swiglu_width

LLAMA3_ROPE = "factor=32,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=8192"


class LlamaFamily(ModelFamily):
    name = "llama"
    hf_model_type = "llama"
    presets = {
        # trains in a few minutes on 2 CPU cores; untied, grouped-query (2 query heads per kv head)
        "llama-tiny": {
            "block_size": 128, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 128,
            "ffn_hidden": 384, "tie_embeddings": False,
        },
        # The published shapes, at Llama 3's pretraining context of 8192 (for plan and bench memory).
        "llama3.2-1b": {
            "block_size": 8192, "n_layer": 16, "n_head": 32, "n_kv_head": 8, "n_embd": 2048,
            "ffn_hidden": 8192, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "tie_embeddings": True,
        },
        "llama3-8b": {
            "block_size": 8192, "n_layer": 32, "n_head": 32, "n_kv_head": 8, "n_embd": 4096,
            "ffn_hidden": 14336, "rope_theta": 500000.0, "tie_embeddings": False,
        },
        "llama3-70b": {
            "block_size": 8192, "n_layer": 80, "n_head": 64, "n_kv_head": 8, "n_embd": 8192,
            "ffn_hidden": 28672, "rope_theta": 500000.0, "tie_embeddings": False,
        },
    }  # fmt: skip
    published_vocab = 128256  # Llama 3's tokenizer
    norm_saved_tensors = 3  # torch's RMSNorm keeps its input, the normalised input and its output

    def shape(self, model: Any, vocab_size: int) -> LlamaShape:
        def key(name: str) -> Any:
            return getattr(model, name, LLAMA_KEYS[name])

        n_head = model.n_head
        try:
            scaling = parse_rope_scaling(key("rope_scaling"))
        except ValueError as exc:
            raise UsageError(f"model.rope_scaling {key('rope_scaling')!r}: {exc}") from None
        return LlamaShape(
            vocab_size=vocab_size,
            block_size=model.block_size,
            n_layer=model.n_layer,
            n_head=n_head,
            n_embd=model.n_embd,
            n_kv_head=key("n_kv_head") or n_head,
            head_dim=key("head_dim") or model.n_embd // n_head,
            ffn_hidden=key("ffn_hidden") or swiglu_width(model.n_embd),
            rope_theta=float(key("rope_theta")),
            rope_scaling=scaling,
            norm_eps=float(key("norm_eps")),
            tie_embeddings=bool(key("tie_embeddings")),
            attention_bias=bool(key("attention_bias")),
            mlp_bias=bool(key("mlp_bias")),
            dropout=getattr(model, "dropout", 0.0),
        )

    def check(self, model: Any, tp: int) -> None:
        if getattr(model, "dropout", 0.0):
            raise UsageError(
                f"model.dropout {model.dropout}: the llama family trains without dropout; set it to 0"
            )
        if not getattr(model, "head_dim", 0) and model.n_embd % model.n_head:
            raise UsageError(
                f"model.n_embd {model.n_embd} is not divisible by model.n_head {model.n_head}; "
                "set model.head_dim to give the heads' width"
            )
        shape = self.shape(model, 1)
        if shape.head_dim % 2:
            raise UsageError(f"head_dim {shape.head_dim} is odd: rotary positions rotate pairs of features")
        if shape.n_head % shape.n_kv_head:
            raise UsageError(
                f"model.n_head {shape.n_head} is not divisible by model.n_kv_head {shape.n_kv_head}: "
                "each key/value head serves a whole group of query heads"
            )
        if shape.n_head % tp:
            raise UsageError(
                f"model.n_head {shape.n_head} is not divisible by tp {tp}: attention is split by heads"
            )
        if shape.n_kv_head % tp:
            raise UsageError(
                f"model.n_kv_head {shape.n_kv_head} is not divisible by tp {tp}: every tensor-parallel rank "
                f"needs whole key/value heads (hpcllm does not replicate them); use tp <= {shape.n_kv_head}"
            )
        if shape.ffn_hidden % tp:
            raise UsageError(f"model.ffn_hidden {shape.ffn_hidden} is not divisible by tp {tp}")

    def parameters(self, shape: Any) -> ParameterCounts:
        d, q, kv, f = shape.n_embd, shape.q_width, shape.kv_width, shape.ffn_hidden
        attention = 2 * d * q + 2 * d * kv + ((q + 2 * kv + d) if shape.attention_bias else 0)
        mlp = 3 * d * f + ((2 * f + d) if shape.mlp_bias else 0)
        output = shape.vocab_size * d
        return ParameterCounts(
            embedding=output,  # token embeddings only: positions are rotary
            per_layer=attention + mlp + 2 * d,  # q, k, v, o; gate, up, down; two RMSNorms
            head=d + (0 if shape.tie_embeddings else output),  # the final RMSNorm, an untied head
            n_layer=shape.n_layer,
            tied_head=output if shape.tie_embeddings else 0,
        )

    def layer_forward_flops(self, shape: Any, micro_batch: int) -> float:
        """2 FLOPs per multiply-add of the block's matrices (q, k, v, o; gate, up, down) for every
        token, and the attention's two matmuls (scores and the weighted sum) over all heads."""
        s, d, q, kv, f = shape.block_size, shape.n_embd, shape.q_width, shape.kv_width, shape.ffn_hidden
        matrices = 2 * d * q + 2 * d * kv + 3 * d * f
        return micro_batch * s * (2 * matrices + 4 * s * q)

    def activation_bytes_per_layer(
        self,
        shape: Any,
        micro_batch: int,
        tp: int,
        recompute: str,
        sequence_parallel: bool,
        element_bytes: int,
    ) -> float:
        """Korthikanti et al.'s method applied to this block (fused attention, `e` bytes an element),
        as autograd keeps it (`bench memory` measures against it):
            none       e*(6sbh + sb(3q + 3kv)/t + 4sbf/t) + 8sb + 4asb/t: the two RMSNorms' inputs,
                       normalised inputs (for the weight's gradient) and outputs (replicated over
                       TP: torch's RMSNorm keeps all three) and their fp32 statistics; the fused qkv
                       output (v is a view of it), the rotated q and k, the attention output (the
                       output projection's input is a view of it); SwiGLU's fused gate/up output,
                       silu(gate) and the product; the attention's fp32 softmax statistics
            selective  the same without the softmax statistics (the core is recomputed)
            full       e*sbh (the block's input)
        With sequence parallelism the replicated terms are divided by t as well."""
        s, b, h, a, t, e = shape.block_size, micro_batch, shape.n_embd, shape.n_head, tp, element_bytes
        split = t if sequence_parallel else 1
        if recompute == "full":
            return e * s * b * h / split
        q, kv, f = shape.q_width, shape.kv_width, shape.ffn_hidden
        per_layer = e * (6 * s * b * h / split + s * b * (3 * q + 3 * kv) / t + 4 * s * b * f / t)
        per_layer += 8 * s * b / split
        return per_layer + (4 * a * s * b / t if recompute == "none" else 0)

    def tensor_parallel_plan(self, shape: Any) -> dict[str, TensorSplit]:
        q, kv, f = shape.q_width, shape.kv_width, shape.ffn_hidden
        return {
            "attn.qkv": TensorSplit(COLUMN, blocks=(q, kv, kv)),  # each rank: its q heads and kv heads
            "attn.proj": TensorSplit(ROW),
            "mlp.gate_up": TensorSplit(COLUMN, blocks=(f, f)),  # gate and up, each split alike
            "mlp.proj": TensorSplit(ROW),
            "wte": TensorSplit(VOCAB),
            "lm_head": TensorSplit(TIED_HEAD if shape.tie_embeddings else VOCAB_HEAD),
        }

    def sequence_parallel_modules(self) -> tuple[str, ...]:
        return ("ln_1", "ln_2", "ln_f")

    def build(self, shape: Any, seed: int | None, layers: range | None, first: bool, last: bool) -> Any:
        from hpcllm.model.llama_net import Llama

        return Llama(shape, seed, layers, first, last)

    def hf(self) -> Any:
        from hpcllm.model import hf_llama

        return hf_llama


LLAMA = LlamaFamily()
