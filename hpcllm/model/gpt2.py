"""The GPT-2 family: its presets, shape, arithmetic, tensor-parallel plan and Hugging Face adapter.
The network itself is `hpcllm.model.gpt` (imported on demand: the arithmetic needs no torch)."""

from __future__ import annotations

from typing import Any

from hpcllm.errors import UsageError
from hpcllm.model.family import COLUMN, ROW, TIED_HEAD, VOCAB, ModelFamily, ParameterCounts, TensorSplit
from hpcllm.model.gpt2_shape import GPTShape
from hpcllm.model.llama_shape import LLAMA_KEYS


class GPT2Family(ModelFamily):
    name = "gpt2"
    hf_model_type = "gpt2"
    published_vocab = 50304  # GPT-2's 50257, padded to a multiple of 64 as Megatron and nanoGPT do
    presets = {
        # trains in a few minutes on 2 CPU cores
        "tiny": {"block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128},
        "small": {"block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 384},
        "gpt2-124m": {"block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768},
        "gpt2-350m": {"block_size": 1024, "n_layer": 24, "n_head": 16, "n_embd": 1024},
        "gpt2-774m": {"block_size": 1024, "n_layer": 36, "n_head": 20, "n_embd": 1280},
        "gpt2-1.5b": {"block_size": 1024, "n_layer": 48, "n_head": 25, "n_embd": 1600},
    }

    def shape(self, model: Any, vocab_size: int) -> GPTShape:
        return GPTShape(
            vocab_size, model.block_size, model.n_layer, model.n_head, model.n_embd, model.dropout
        )

    def check(self, model: Any, tp: int) -> None:
        for key, unset in LLAMA_KEYS.items():
            if getattr(model, key, unset) != unset:
                raise UsageError(
                    f"model.{key} is a setting of the llama family, which GPT-2 does not have: "
                    "set model.family=llama (or a llama preset), or leave it out"
                )
        if model.n_embd % model.n_head:
            raise UsageError(f"model.n_embd {model.n_embd} is not divisible by model.n_head {model.n_head}")
        if model.n_head % tp:
            raise UsageError(
                f"model.n_head {model.n_head} is not divisible by tp {tp}: attention is split by heads"
            )
        if (4 * model.n_embd) % tp:
            raise UsageError(f"the MLP width 4 × n_embd = {4 * model.n_embd} is not divisible by tp {tp}")

    def parameters(self, shape: Any) -> ParameterCounts:
        d = shape.n_embd
        return ParameterCounts(
            embedding=(shape.vocab_size + shape.block_size) * d,  # tokens and learned positions
            per_layer=12 * d**2 + 13 * d,  # qkv, attention projection, MLP in and out, two LayerNorms
            head=2 * d,  # the final LayerNorm; the head is tied to the token embedding
            n_layer=shape.n_layer,
            tied_head=shape.vocab_size * d,
        )

    def layer_forward_flops(self, shape: Any, micro_batch: int) -> float:
        s, h = shape.block_size, shape.n_embd
        return 24 * micro_batch * s * h * h * (1 + s / (6 * h))

    def activation_bytes_per_layer(
        self,
        shape: Any,
        micro_batch: int,
        tp: int,
        recompute: str,
        sequence_parallel: bool,
        element_bytes: int,
    ) -> float:
        """Korthikanti et al. 2022 (Table 2) for 16-bit activations; for fp32 (CPU training) the same
        method applied to hpcllm's layer with fused attention, which `bench memory` measures against:
            none       16*sbh + 48*sbh/t + 4*asb/t + 16*sb  (LayerNorm inputs, outputs and statistics
                       replicated over TP; q, k, v, the projection input and the MLP's 4h split)
            selective  the same without the softmax statistics (the core is recomputed)
            full       4*sbh (the block's input)
        With sequence parallelism the replicated terms are divided by t as well."""
        s, b, h, a, t = shape.block_size, micro_batch, shape.n_embd, shape.n_head, tp
        sbh, split = s * b * h, t if sequence_parallel else 1
        if element_bytes == 4:
            if recompute == "full":
                return 4 * sbh / split
            per_layer = 16 * sbh / split + 48 * sbh / t + 16 * s * b / split
            return per_layer + (4 * a * s * b / t if recompute == "none" else 0)
        if recompute == "full":
            return 2 * sbh / split
        attention_core = 0 if recompute == "selective" else 5 * a * s / (h * t)
        if sequence_parallel:
            return sbh * (34 / t + attention_core)
        return sbh * (10 + 24 / t + attention_core)

    def tensor_parallel_plan(self, shape: Any) -> dict[str, TensorSplit]:
        d = shape.n_embd
        return {
            "attn.qkv": TensorSplit(COLUMN, blocks=(d, d, d)),  # q, k, v each split by head
            "attn.proj": TensorSplit(ROW),
            "mlp.fc": TensorSplit(COLUMN),
            "mlp.proj": TensorSplit(ROW),
            "wte": TensorSplit(VOCAB),
            "lm_head": TensorSplit(TIED_HEAD),
        }

    def sequence_parallel_modules(self) -> tuple[str, ...]:
        return ("ln_1", "ln_2", "ln_f")

    def build(self, shape: Any, seed: int | None, layers: range | None, first: bool, last: bool) -> Any:
        from hpcllm.model.gpt import GPT

        return GPT(shape, seed, layers, first, last)

    def hf(self) -> Any:
        from hpcllm.model import hf_gpt2

        return hf_gpt2


GPT2 = GPT2Family()
