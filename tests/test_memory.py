"""Memory per rank: activation recomputation (and, as they land, the distributed optimizer and
sequence parallelism), each against the single-process run on the same seed and data."""

import torch
from conftest import TINY, assert_same_losses, losses, run_hpcllm, sets

from hpcllm.model.gpt import GPT, GPTShape

STEPS = ["--steps", 20, *sets("train.eval_every=0")]


def saved_activation_bytes(model: GPT, idx: torch.Tensor) -> int:
    """Bytes that autograd keeps for backward during one forward (parameters excluded)."""
    parameters = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if tensor.data_ptr() not in parameters:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(model(idx), idx).backward()
    return total


def test_recomputation_keeps_fewer_activations_and_gives_the_same_gradients():
    torch.manual_seed(0)
    shape = GPTShape(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=32)
    idx = torch.randint(0, 64, (2, 64))
    kept, grads = {}, {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(1)
        model = GPT(shape)
        model.set_recompute(mode)
        kept[mode] = saved_activation_bytes(model, idx)
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert kept["full"] < kept["selective"] < kept["none"], kept
    for mode in ("selective", "full"):
        for name, grad in grads["none"].items():
            assert torch.allclose(grads[mode][name], grad, rtol=1e-5, atol=1e-7), (mode, name)


def test_recomputation_at_tp2_and_pp2_matches_one_process(data_dir, tmp_path):
    reference = tmp_path / "one"
    proc = run_hpcllm(["train", "--data", data_dir, "--out", reference, *TINY, *STEPS])
    assert proc.returncode == 0, proc.stderr
    for mode in ("full", "selective"):
        for layout in (["--tp", 2], ["--pp", 2]):
            out = tmp_path / f"{mode}-{layout[0][2:]}2"
            proc = run_hpcllm(
                ["train", "--data", data_dir, "--out", out, *TINY, *STEPS, *layout]
                + sets(f"train.recompute={mode}"),
                ranks=2,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert_same_losses(losses(reference), losses(out), out.name)


def test_a_pipeline_stage_builds_only_its_parts_with_the_single_process_values():
    shape = GPTShape(vocab_size=50, block_size=16, n_layer=4, n_head=2, n_embd=16)
    full = dict(GPT(shape, seed=7).named_parameters())
    assert sum(p.numel() for p in full.values()) == shape.parameter_count
    stages = {
        "first": GPT(shape, 7, range(0, 1), first=True, last=False),
        "middle": GPT(shape, 7, range(1, 3), first=False, last=False),
        "last": GPT(shape, 7, range(3, 4), first=False, last=True),
    }
    held = {name: dict(stage.named_parameters()) for name, stage in stages.items()}
    assert not any(n.startswith(("wte", "wpe", "blocks.0", "blocks.3")) for n in held["middle"])
    assert {n.split(".")[1] for n in held["middle"] if n.startswith("blocks.")} == {"1", "2"}
    assert "wte.weight" in held["last"] and "wpe.weight" not in held["last"]  # the tied head's copy
    for parameters in held.values():
        for name, tensor in parameters.items():
            assert torch.equal(tensor, full[name]), name
    # Every tensor of the model is on some stage, once (the last stage's tied copy aside).
    counted = sum(
        t.numel() for s in held.values() for n, t in s.items() if (s, n) != (held["last"], "wte.weight")
    )
    assert counted == shape.parameter_count
