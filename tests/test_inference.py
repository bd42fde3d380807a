"""Generation with a KV cache and padded batches gives what the plain forward gives (one process),
for both families: GPT-2's learned positions, Llama's rotary positions counted per row and a cache
of its grouped key/value heads."""

import pytest
import torch

from hpcllm.model import inference
from hpcllm.model.gpt import GPT, GPTShape
from hpcllm.model.llama import LLAMA
from hpcllm.model.llama_shape import LlamaShape

SHAPE = GPTShape(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)
LLAMA_SHAPE = LlamaShape(
    vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32, n_kv_head=2, head_dim=8, ffn_hidden=64
)
FAMILIES = ["gpt2", "llama"]


def model(family="gpt2"):
    if family == "llama":
        return LLAMA.build(LLAMA_SHAPE, 3, None, True, True).eval()
    return GPT(SHAPE, seed=3).eval()


def reference(gpt, prompt, new):
    """Greedy tokens from the whole-context forward, the context cropped to block_size."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new):
            next_token = gpt(ids[:, -SHAPE.block_size :])[:, -1, :].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_batched_generation_matches_the_plain_forward(family):
    gpt = model(family)
    g = torch.Generator().manual_seed(0)
    # Prompts of different lengths (padding), one long enough to slide past block_size.
    prompts = [torch.randint(0, SHAPE.vocab_size, (n,), generator=g).tolist() for n in (1, 5, 9, 20)]
    expected = [reference(gpt, p, 12) for p in prompts]
    for use_cache in (True, False):
        assert inference.generate(gpt, prompts, 12, use_cache=use_cache) == expected, use_cache
    assert [inference.generate(gpt, [p], 12)[0] for p in prompts] == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_equal_the_full_forward_position_by_position(family):
    gpt = model(family)
    ids = torch.randint(0, SHAPE.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = gpt(ids)
        cache = inference.KVCache(SHAPE.block_size)
        valid = torch.ones((2, 4), dtype=torch.bool)
        first = inference.next_logits(gpt, ids[:, :4], valid, cache)
        torch.testing.assert_close(first, full[:, 3], rtol=0, atol=1e-5)
        for t in range(4, 10):
            valid = torch.ones((2, t + 1), dtype=torch.bool)
            step = inference.next_logits(gpt, ids[:, t : t + 1], valid, cache)
            torch.testing.assert_close(step, full[:, t], rtol=0, atol=1e-5)
    # The cache holds the key/value heads only: n_kv_head of Llama's (grouped), n_head of GPT-2's.
    heads = LLAMA_SHAPE.n_kv_head if family == "llama" else SHAPE.n_head
    assert cache.keys[0].shape[1] == heads and cache.values[1].shape[1] == heads


def test_sampling_is_per_row_and_top_k_bounded():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert inference.choose(logits, 0.0, None, None).item() == 2
    draws = {inference.choose(logits, 1.0, 2, torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {2, 3}
