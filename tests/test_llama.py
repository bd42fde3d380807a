"""The Llama family: the published shapes' parameter counts and FLOPs, and every layout and memory
mode against the single-process run on the same seed and data (1e-5 at step 1, 1e-3 over 20
steps), with resume at another layout and generation over tensor-parallel replicas."""

import json
import shutil
from types import SimpleNamespace

import pytest
from conftest import assert_same_losses, losses, run_hpcllm, sets

from hpcllm.model.family import COLUMN, TensorSplit
from hpcllm.model.llama import LLAMA
from hpcllm.model.registry import PRESETS

# The totals Meta and Hugging Face publish (the model cards' and safetensors index's counts).
PUBLISHED = {"llama3.2-1b": 1_235_814_400, "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496}


def preset_shape(name, vocab=LLAMA.published_vocab):
    family, keys = PRESETS[name]
    assert family == "llama"
    return LLAMA.shape(SimpleNamespace(**keys, dropout=0.0), vocab)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_shapes_count_their_published_parameters(name):
    shape = preset_shape(name)
    counts = LLAMA.parameters(shape)
    assert counts.total == PUBLISHED[name]
    # FLOPs: the family's per-layer formula, three forwards' worth plus the head, is the
    # 6N + attention rule of the PaLM, Megatron and torchtitan papers, N without the embedding
    # lookup and the norms (no matmul).
    s, L = shape.block_size, shape.n_layer
    matmul_parameters = counts.total - counts.embedding - L * 2 * shape.n_embd - shape.n_embd
    if shape.tie_embeddings:
        matmul_parameters += counts.tied_head  # the tied head is a matmul once more
    rule = 6 * matmul_parameters + 12 * L * shape.n_head * shape.head_dim * s
    assert LLAMA.iteration_flops(shape, 1, recompute=False) / s == pytest.approx(rule, rel=1e-12)
    plan = LLAMA.tensor_parallel_plan(shape)
    assert plan["attn.qkv"] == TensorSplit(COLUMN, blocks=(shape.q_width, shape.kv_width, shape.kv_width))


def test_the_model_counts_what_it_builds_tied_and_untied():
    for tied in (False, True):
        keys = dict(PRESETS["llama-tiny"][1], tie_embeddings=tied, n_layer=2)
        shape = LLAMA.shape(SimpleNamespace(**keys, dropout=0.0), 300)
        model = LLAMA.build(shape, 0, None, True, True)
        assert LLAMA.parameters(shape).total == sum(p.numel() for p in model.parameters())
        last = LLAMA.build(shape, 0, range(1, 2), False, True)  # a last pipeline stage
        assert (last.wte is not None) == tied  # the tied copy; an untied head is its own weight


LLAMA_TINY = sets(
    "model.preset=llama-tiny",
    "model.n_layer=2",
    "model.n_embd=32",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.ffn_hidden=64",
    "model.block_size=32",
    "train.global_batch=8",
    "train.micro_batch=2",  # 4 micro-batches a step at dp 1: gradient accumulation
    "train.log_every=1",
    "train.eval_every=100",
    "train.warmup=5",
    "train.ckpt_every=10",
    "train.keep=5",
)
SEQUENCE_PARALLEL = sets("parallel.sequence_parallel=true")
# name -> (ranks, flags, reference): each layout against the single-process run of its reference.
LAYOUTS = {
    "tp2-sequence-parallel-selective": (
        2, ["--tp", "2", *sets("parallel.sequence_parallel=true", "train.recompute=selective")], "fp32"
    ),
    "3d-pp2xdp2xtp2-zero2-full-sp": (
        8,
        ["--pp", "2", "--tp", "2", *sets("parallel.zero=2", "train.recompute=full"), *SEQUENCE_PARALLEL],
        "fp32",
    ),
    "dp2xtp2-zero3-bf16-sp-full": (
        4,
        ["--tp", "2", *sets("parallel.zero=3", "train.dtype=bfloat16", "train.recompute=full")]
        + SEQUENCE_PARALLEL,
        "bf16",
    ),
    "pp2xdp2-zero3-tied": (4, ["--pp", "2", *sets("parallel.zero=3", "model.tie_embeddings=true")], "tied"),
    "cp2xtp2-grouped-query": (4, ["--cp", "2", "--tp", "2"], "fp32"),
    "cp2xpp2-zero3-tied": (
        4,
        ["--cp", "2", "--pp", "2", *sets("parallel.zero=3", "model.tie_embeddings=true")],
        "tied",
    ),
}  # fmt: skip
REFERENCES = {"fp32": [], "bf16": sets("train.dtype=bfloat16"), "tied": sets("model.tie_embeddings=true")}


def test_every_layout_matches_the_single_process_run(data_dir, tmp_path):
    def train(out, flags, ranks=None):
        args = ["train", "--data", data_dir, "--out", out, *LLAMA_TINY, "--steps", 20, *flags]
        proc = run_hpcllm(args, ranks=ranks, timeout=400)
        assert proc.returncode == 0, proc.stderr
        return losses(out)

    reference = {name: train(tmp_path / f"ref-{name}", flags) for name, flags in REFERENCES.items()}
    for name, (ranks, flags, against) in LAYOUTS.items():
        assert_same_losses(reference[against], train(tmp_path / name, flags, ranks), name)
    # Resume the tp 2 run's step 10 in one process: resharded, steps 11-20 as the reference's.
    resumed = tmp_path / "resumed-tp1"
    shutil.copytree(tmp_path / "tp2-sequence-parallel-selective", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000020")
    (resumed / "checkpoints" / "latest").write_text("step-00000010\n")
    proc = run_hpcllm(
        ["train", "--out", resumed, "--resume", "--tp", 1, *sets("parallel.sequence_parallel=false")]
    )
    assert proc.returncode == 0, proc.stderr
    got = losses(resumed)
    for step in range(11, 21):
        assert abs(got[step] - reference["fp32"][step]) <= 1e-3 * reference["fp32"][step], step
    # Generation: tp 2 in two replicas over the work queue gives the one-process text.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def \nclass A:\nimport \nreturn x\n")
    texts = {}
    for tp, ranks in ((1, None), (2, 4)):
        out = tmp_path / f"gen-tp{tp}.jsonl"
        proc = run_hpcllm(
            ["generate", "--run", resumed, "--prompts", prompts, "--output", out, "--tp", tp,
             "--max-new-tokens", 8, "--temperature", 0],
            ranks=ranks,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        texts[tp] = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert texts[1] == texts[2] and len(texts[1]) == 4


def test_bench_memory_measures_what_the_family_formula_predicts():
    """Activations autograd keeps for one micro-batch of the Llama tiny preset, in every
    recomputation mode: the family's formula within 1% (measured: 0.06%)."""
    from hpcllm.bench import memory as bench_memory
    from hpcllm.training import config as config_mod

    config = config_mod.load(assignments=["model.preset=llama-tiny", "train.micro_batch=2"])
    for row in bench_memory.run(config, vocab_size=512, dp=1, steps=1):
        assert row["predicted_activation_bytes"] == pytest.approx(row["activation_bytes"], rel=0.01), row


def test_plan_uses_the_family_and_says_how_to_train_the_llama_it_picked():
    from hpcllm.planner.search import candidates
    from hpcllm.planner.step_model import ModelSpec

    proc = run_hpcllm(
        ["plan", "--model", "llama3-8b", "--cluster", "h100", "--nodes", 4, "--top", 3, "--json"]
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert all(row["fits"] and row["tp"] * row["pp"] * row["dp"] * row["cp"] == 32 for row in rows)
    text = run_hpcllm(["plan", "--model", "llama3-8b", "--cluster", "h100", "--nodes", 4]).stdout
    assert text.startswith("8.03B parameters")
    command = text.splitlines()[text.splitlines().index("run the first:") + 1]
    for setting in (
        "model.family=llama",
        "model.n_kv_head=8",
        "model.ffn_hidden=14336",
        "tie_embeddings=false",
    ):
        assert setting in command, command
    # Tensor parallelism splits key/value heads too: 2 of them allow tp 1 and 2 only.
    spec = ModelSpec.of_preset("llama-tiny", 512)
    assert {layout.tp for layout in candidates(spec, 8, 8, 32)} == {1, 2}
    assert spec.shape.n_kv_head == 2 and spec.counts.total == LLAMA.parameters(spec.shape).total
