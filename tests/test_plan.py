"""`hpcllm plan`: the step model against published runs, the search, and bad input."""

import json

import pytest
from conftest import assert_usage_error, run_hpcllm

from hpcllm.planner import profiles
from hpcllm.planner.step_model import Layout, ModelSpec, activation_bytes_per_layer, iteration_flops, predict

# Narayanan et al. 2021 (arXiv 2104.04473), Table 1: GPT on DGX A100 (Selene), sequence 2048,
# vocabulary 51,200, full activation recomputation. Billions of parameters, heads, hidden size,
# layers, tp, pp, GPUs, global batch, achieved TFLOP/s per GPU (the paper's Eq. 3 convention).
NARAYANAN_TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


@pytest.mark.parametrize("row", NARAYANAN_TABLE_1, ids=lambda row: f"{row[0]}B")
def test_published_megatron_runs_are_predicted_within_20_percent(row):
    billions, heads, hidden, layers, tp, pp, gpus, batch, published = row
    model = ModelSpec(n_layer=layers, n_embd=hidden, n_head=heads, block_size=2048, vocab=51200)
    assert abs(model.parameters / 1e9 - billions) <= 0.05 * billions  # the same model
    layout = Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), micro_batch=1, recompute="full")
    got = predict(model, layout, profiles.load("a100"), batch)
    assert abs(got.tflops_per_gpu / 1e12 / published - 1) <= 0.20, got.tflops_per_gpu / 1e12
    assert got.fits
    # Their Eq. 3 counts the recomputed forward; MFU never does.
    assert got.mfu == pytest.approx(
        got.tflops_per_gpu
        / 312e12
        * iteration_flops(model, batch, False)
        / iteration_flops(model, batch, True)
    )


def test_activation_memory_follows_korthikanti_table_2():
    """Per layer, 16-bit: sbh(34 + 5as/h); tp: sbh(10 + 24/t + 5as/(ht)); tp + sp: sbh(34/t + 5as/(ht));
    selective drops the 5as/h term; full keeps 2sbh (÷ t with sp)."""
    model = ModelSpec(n_layer=96, n_embd=12288, n_head=96, block_size=2048, vocab=51200)  # GPT-3 175B
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    cases = {
        Layout(1, 1, 1, b): sbh * (34 + 5 * a * s / h),
        Layout(t, 1, 1, b): sbh * (10 + 24 / t + 5 * a * s / (h * t)),
        Layout(t, 1, 1, b, sequence_parallel=True): sbh * (34 / t + 5 * a * s / (h * t)),
        Layout(t, 1, 1, b, recompute="selective", sequence_parallel=True): sbh * 34 / t,
        Layout(t, 1, 1, b, recompute="full"): 2 * sbh,
    }
    for layout, expected in cases.items():
        assert activation_bytes_per_layer(model, layout) == pytest.approx(expected, rel=0.05), layout


def test_plan_ranks_layouts_that_fit_and_prints_json_rows():
    proc = run_hpcllm(
        ["plan", "--model", "gpt2-350m", "--cluster", "a100", "--nodes", 2, "--top", 3, "--json"]
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 3
    keys = {"tp", "pp", "dp", "micro_batch", "zero", "recompute", "sequence_parallel", "fits"}
    keys |= {"memory_gib_per_rank", "step_s", "tokens_per_s", "tflops_per_gpu", "mfu", "breakdown"}
    assert all(keys <= set(row) for row in rows)
    assert all(row["fits"] and row["tp"] * row["pp"] * row["dp"] == 16 for row in rows)
    assert [row["tokens_per_s"] for row in rows] == sorted(
        (row["tokens_per_s"] for row in rows), reverse=True
    )
    one = run_hpcllm(["plan", "--model", "gpt2-350m", "--nodes", 2, "--layout", "tp=2,pp=2,recompute=full"])
    assert one.returncode == 0 and "compute / tp / bubble" in one.stdout


def test_plan_draws_the_breakdown_and_writes_the_batch_script_of_the_best(tmp_path):
    plan = ["plan", "--model", "gpt2-350m", "--nodes", 2, "--top", 4, "--json"]
    proc = run_hpcllm([*plan, "--plot", tmp_path / "plan.png", "--emit-slurm", tmp_path / "job"])
    assert proc.returncode == 0, proc.stderr
    best = json.loads(proc.stdout)[0]
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    script = (tmp_path / "job" / "hpcllm-plan.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-task=1" in script
    assert f"--tp {best['tp']} --pp {best['pp']}" in script
    assert f"train.micro_batch={best['micro_batch']}" in script and "model.n_layer=24" in script
    again = run_hpcllm([*plan, "--emit-slurm", tmp_path / "job"])  # never overwritten
    assert_usage_error(again, "hpcllm-plan.sbatch exists")


def test_bad_plans_are_one_line(tmp_path):
    profile = tmp_path / "mine.yaml"
    profile.write_text((profiles.SHIPPED / "a100.yaml").read_text() + "nvlink_magic: 3\n")
    huge = "n_layer=200,n_embd=32768,n_head=256,block_size=4096,vocab=51200"
    for args, needle in (
        (["--model", huge, "--nodes", 1], "the model fits no layout on 8 GPUs of 80 GiB"),
        (["--model", "gpt2-124m", "--layout", "tp=3"], "tp x pp = 3 does not divide the 8 GPUs"),
        (["--model", "gpt2-124m", "--cluster", profile], "unknown field 'nvlink_magic'"),
        (["--model", "gpt2-124m", "--cluster", "tpu"], "no such file or shipped profile"),
        (["--model", "n_layer=2"], "missing 'block_size'"),
        (["--model", "gpt2-124m", "--layout", "tp=0"], "tp must be at least 1, not 0"),
        (["--model", "n_layer=0,n_embd=0,n_head=0,block_size=1,vocab=1"], "n_layer must be at least 1"),
    ):
        assert_usage_error(run_hpcllm(["plan", *args]), needle)
