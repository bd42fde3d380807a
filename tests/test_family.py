"""The seams a second model family, loss masks and sharded parameters build on: the family's
arithmetic against the model it builds, blocks of unequal sizes cut and joined, the loss as a sum
over trained targets divided once, and families and presets named in the config."""

import pytest
import torch
from conftest import assert_usage_error, train

from hpcllm.batch import IGNORE
from hpcllm.model.family import COLUMN, TensorSplit
from hpcllm.model.gpt import GPT
from hpcllm.model.gpt2 import GPT2
from hpcllm.model.gpt2_shape import GPTShape
from hpcllm.model.registry import PRESETS, family_named, family_of_shape
from hpcllm.parallel.sharding import Sharding, shard, unshard
from hpcllm.training.config import load


def test_the_family_counts_what_it_builds_and_splits_the_stages_by_it():
    shape = GPTShape(vocab_size=50, block_size=16, n_layer=4, n_head=2, n_embd=16)
    counts = GPT2.parameters(shape)
    model = GPT2.build(shape, 0, None, True, True)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.per_layer == sum(p.numel() for p in model.blocks[0].parameters())
    assert counts.embedding == model.wte.weight.numel() + model.wpe.weight.numel()
    assert GPT2.flops_per_token(shape) == 6 * counts.total + 12 * 4 * 16 * 16
    assert family_of_shape(shape) is GPT2 and isinstance(model, GPT)
    assert GPT2.plan_stages(shape, 2).layers_per_stage == [2, 2]
    assert GPT2.plan_stages(shape, 2, "3,1").layers_per_stage == [3, 1]
    # The plan names every Linear and the embedding of a block or the model; the split of q, k, v is data.
    plan = GPT2.tensor_parallel_plan(shape)
    assert plan["attn.qkv"] == TensorSplit(COLUMN, blocks=(16, 16, 16))
    named = {name.split(".", 2)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert named <= set(plan)
    assert {"gpt2-124m", "tiny"} <= set(PRESETS) and PRESETS["tiny"][0] == "gpt2"


def test_blocks_of_unequal_sizes_are_each_split_alike():
    """Grouped-query attention stacks q (8 rows here) and k, v (2 each): every rank gets its share
    of each block, and the join restores the whole."""
    full = torch.arange(12 * 3, dtype=torch.float32).reshape(12, 3)
    split = Sharding(dim=0, blocks=(8, 2, 2))
    parts = [shard(full, split, rank, 2) for rank in range(2)]
    assert torch.equal(parts[0], full[[0, 1, 2, 3, 8, 10]])
    assert torch.equal(parts[1], full[[4, 5, 6, 7, 9, 11]])
    assert torch.equal(unshard(parts, split), full)
    assert Sharding.from_json(split.to_json()) == split
    equal = Sharding(dim=0, blocks=3)
    assert torch.equal(unshard([shard(full, equal, r, 2) for r in range(2)], equal), full)


def test_the_loss_is_a_sum_over_trained_targets_divided_once():
    """With a loss mask, the gradient of sum / count over the whole batch does not depend on how
    the batch is cut into micro-batches (a mean per micro-batch would weigh rows unequally)."""
    shape = GPTShape(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8)
    tokens = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(0))
    targets = tokens.roll(-1, dims=1)
    targets[0, :6] = IGNORE  # a prompt's tokens: not trained on
    targets[2, :1] = IGNORE
    count = int((targets != IGNORE).sum())

    def gradient(micro_batch):
        model = GPT(shape, seed=1)
        for rows in range(0, 4, micro_batch):
            sl = slice(rows, rows + micro_batch)
            (model.loss_sum(model(tokens[sl]), targets[sl]) / count).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    whole = gradient(4)
    assert torch.allclose(gradient(1), whole, atol=1e-6) and torch.allclose(gradient(2), whole, atol=1e-6)
    model = GPT(shape, seed=1)
    loss = model.loss(model(tokens), targets)
    plain = torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 20), targets.reshape(-1))
    assert torch.allclose(loss, plain)  # the one-batch mean is torch's, ignore index included


def test_families_and_presets_are_named_in_the_config(data_dir, tmp_path):
    config = load(assignments=["model.preset=gpt2-124m"])
    assert config.model.family == "gpt2" and config.model.n_embd == 768
    with pytest.raises(Exception, match="unknown model.family 'mamba'; choose one of gpt2"):
        family_named("mamba")
    assert_usage_error(train(data_dir, tmp_path / "r", "--set", "model.family=mamba"), "unknown model.family")
    assert not (tmp_path / "r").exists()
