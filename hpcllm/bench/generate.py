"""`hpcllm bench generate`: tokens/s of greedy generation with and without the KV cache, and
against `transformers`' own `generate` on the same model exported as a Hugging Face folder of its
family (GPT2LMHeadModel, LlamaForCausalLM).

The model is the preset's shape (the tiny one by default; its block_size raised to hold the prompt
and the new tokens, as both implementations need), seeded weights, and the default corpus's
tokenizer. One prompt
(batch 1, the latency case) and a batch of 8; each variant runs `repeat` times interleaved and
reports its best run. The greedy tokens of all variants must agree, or the comparison is void.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from hpcllm.data import tokenizer as tok
from hpcllm.data.tokens import open_prepared
from hpcllm.errors import EnvironmentProblem
from hpcllm.model import inference
from hpcllm.model.gpt import GPT
from hpcllm.model.registry import PRESETS, family_named
from hpcllm.training.export import write_hf_folder

PROMPT_TOKENS = 64
CACHE_TARGET = 5.0  # cached over uncached tokens/s at 256 new tokens
TRANSFORMERS_TARGET = 1.0


VARIANTS = ("hpcllm, no cache", "hpcllm, KV cache", "transformers generate")


@torch.no_grad()
def _generate(
    variant: str, model: GPT, theirs: Any, prompts: torch.Tensor, new_tokens: int
) -> list[list[int]]:
    if variant == "transformers generate":
        out = theirs.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
        )
        return out[:, prompts.shape[1] :].tolist()
    return inference.generate(model, prompts.tolist(), new_tokens, use_cache=variant == "hpcllm, KV cache")


def run(data: Path, preset: str, new_tokens: int, batches: tuple[int, ...], repeat: int) -> dict[str, Any]:
    try:
        import transformers
    except ImportError as exc:
        raise EnvironmentProblem(
            "bench generate compares with transformers: pip install transformers (or 'hpcllm[hf]')"
        ) from exc
    prepared = open_prepared(data, verify=False)
    tokenizer = tok.load(prepared.tokenizer_path)
    family_name, keys = PRESETS[preset]
    family = family_named(family_name)
    section = SimpleNamespace(**(keys | {"block_size": PROMPT_TOKENS + new_tokens}), dropout=0.0)
    shape = family.shape(section, prepared.vocab_size)
    model = family.build(shape, 0, None, True, True).eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcllm-bench-generate-") as tmp:
        folder = Path(tmp) / "model"
        write_hf_folder(model, tokenizer, folder)
        theirs = getattr(transformers, family.hf().ARCHITECTURE).from_pretrained(folder).eval()
        theirs.generation_config.eos_token_id = None  # generate all the tokens, as hpcllm does
        theirs.generation_config.pad_token_id = 0
        for batch in batches:
            prompts = torch.randint(0, shape.vocab_size, (batch, PROMPT_TOKENS), generator=generator)
            best = dict.fromkeys(VARIANTS, 0.0)
            tokens: dict[str, list[list[int]]] = {}
            for _ in range(repeat):
                for name in VARIANTS:
                    start = time.perf_counter()
                    tokens[name] = _generate(name, model, theirs, prompts, new_tokens)
                    best[name] = max(best[name], batch * new_tokens / (time.perf_counter() - start))
            same = all(out == tokens["hpcllm, KV cache"] for out in tokens.values())
            rows += [
                {"batch": batch, "variant": name, "tokens_per_s": rate, "same_greedy_tokens": same}
                for name, rate in best.items()
            ]
    by = {(r["batch"], r["variant"]): r["tokens_per_s"] for r in rows}
    ratios = {}
    for batch in batches:
        cached = by[(batch, "hpcllm, KV cache")]
        ratios[f"batch {batch}: KV cache / no cache"] = cached / by[(batch, "hpcllm, no cache")]
        ratios[f"batch {batch}: hpcllm / transformers"] = cached / by[(batch, "transformers generate")]
    return {
        "preset": preset,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "rows": rows,
        "ratios": ratios,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"greedy generation, {result['preset']} shape, {result['prompt_tokens']}-token prompts, "
        f"{result['new_tokens']} new tokens, {result['threads']} threads, "
        f"transformers {result['transformers']}",
        f"{'batch':>5}  {'variant':<24} {'tokens/s':>10}  same greedy tokens",
    ]
    for r in result["rows"]:
        same = "yes" if r["same_greedy_tokens"] else "NO"
        lines.append(f"{r['batch']:>5}  {r['variant']:<24} {r['tokens_per_s']:>10,.0f}  {same}")
    for label, value in result["ratios"].items():
        target = CACHE_TARGET if "no cache" in label else TRANSFORMERS_TARGET
        lines.append(f"{label}: {value:.2f}x (target >= {target:g}x)")
    return "\n".join(lines)
