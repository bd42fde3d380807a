"""`hpcllm plan`: the step model against published runs, the search, and bad input."""

import dataclasses
import json

import pytest
import yaml
from conftest import TINY, assert_usage_error, run_hpcllm

from hpcllm.cli.plan import parse_model
from hpcllm.cluster.launcher import launch_env
from hpcllm.errors import UsageError
from hpcllm.planner import auto, calibrate, calibrate_runs, profiles, validate
from hpcllm.planner.search import layout_arguments, layout_text, parse_layout, ranked
from hpcllm.planner.step_model import (
    GIB,
    ModelSpec,
    PlannedLayout,
    activation_bytes_per_layer,
    iteration_flops,
    layer_forward_flops,
    predict,
)
from hpcllm.training import config as config_mod
from hpcllm.training.plan import context_parallel_problem

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
    layout = PlannedLayout(tp=tp, pp=pp, dp=gpus // (tp * pp), micro_batch=1, recompute="full")
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
        PlannedLayout(1, 1, 1, b): sbh * (34 + 5 * a * s / h),
        PlannedLayout(t, 1, 1, b): sbh * (10 + 24 / t + 5 * a * s / (h * t)),
        PlannedLayout(t, 1, 1, b, sequence_parallel=True): sbh * (34 / t + 5 * a * s / (h * t)),
        PlannedLayout(t, 1, 1, b, recompute="selective", sequence_parallel=True): sbh * 34 / t,
        PlannedLayout(t, 1, 1, b, recompute="full"): 2 * sbh,
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


def test_plan_models_the_micro_batch_on_gpus_ranks_distinct_grids_and_says_how_to_run_the_best():
    """On an A100 a micro-batch of 1024 tokens leaves the GPU half idle and pays the fixed costs
    per micro-batch 8 times as often: micro-batch 8 is faster, and the table lists each tp x pp x dp
    once (its fastest setting), then the command that runs the first."""
    model, a100 = parse_model("gpt2-124m"), profiles.load("a100")
    step = {mb: predict(model, PlannedLayout(1, 1, 8, mb), a100, 512).step_s for mb in (1, 8)}
    assert step[8] < 0.85 * step[1], step
    proc = run_hpcllm(["plan", "--model", "gpt2-124m", "--cluster", "a100"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = [line.split() for line in lines[2:] if line[:3].strip().isdigit()]
    grids = [tuple(row[:3]) for row in rows]
    assert len(rows) >= 5 and len(set(grids)) == len(grids), proc.stdout
    assert int(rows[0][3]) > 1 and "-0.000" not in proc.stdout  # micro-batch, bubble
    command = lines[lines.index("run the first:") + 1].strip()
    assert command.startswith("python -m hpcllm.launcher -np 8 hpcllm train --data DATA --tp 1 --pp 1")
    assert f"train.micro_batch={rows[0][3]}" in command and "--emit-slurm" in lines[-1]
    every = run_hpcllm(["plan", "--model", "gpt2-124m", "--all-settings", "--top", 3])
    assert [line.split()[:3] for line in every.stdout.splitlines()[2:5]] == [["1", "1", "8"]] * 3


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
        (["--model", "gpt2-124m", "--cluster", "tpu"], "no such file or profile"),
        (["--model", "gpt2-124m", "--layout", "tp=2,pp=2,dp=3"], "tp x pp x dp = 12, but there are 8 GPUs"),
        (["--model", "gpt2-124m", "--layout", "tp=2,warp=9"], "unknown warp=9"),
        (["--model", "n_layer=2"], "missing 'block_size'"),
        (["--model", "gpt2-124m", "--layout", "tp=0"], "tp must be at least 1, not 0"),
        (["--model", "n_layer=0,n_embd=0,n_head=0,block_size=1,vocab=1"], "n_layer must be at least 1"),
    ):
        assert_usage_error(run_hpcllm(["plan", *args]), needle)


def test_bad_plans_exit_2_with_one_line_for_the_local_profile_too(tmp_path):
    env = {**launch_env(), "XDG_CONFIG_HOME": str(tmp_path)}
    for args, needle in (
        (
            ["--model", "tiny", "--cluster", "local"],
            "this machine is not calibrated yet; run `hpcllm plan calibrate`",
        ),
        (["validate", "--model", "tiny", "--layout", "tp=2,pp=2"], "not calibrated yet"),
        (["--nodes", "2"], "--model is required"),
    ):
        assert_usage_error(run_hpcllm(["plan", *args], env=env), needle)
    # A layout hpcllm train would refuse is refused before the first run of a benchmark.
    bad_layout = run_hpcllm(["bench", "train", "--layout", "tp=3,pp=1,dp=1,micro_batch=8"], env=env)
    assert_usage_error(
        bad_layout, "--layout tp=3,pp=1,dp=1,micro_batch=8: model.n_head 4 is not divisible by tp 3"
    )


# A CPU node as `plan calibrate` writes it (the figures are this VM's order of magnitude).
CPU_NODE = profiles.ClusterProfile(
    name="cpu",
    gpus_per_node=2,
    memory_gib=16,
    peak_flops=150e9,
    gemm_efficiency=0.8,
    gemm_half_size=20,
    intra_node_gbps=3,
    inter_node_gbps=3,
    intra_node_latency_us=18,
    inter_node_latency_us=18,
    collective_efficiency=1,
    dp_overlap=0,
    cores_per_node=2,
    layer_overhead_us=1000,
    head_efficiency=0.7,
    micro_batch_overhead_us=1500,
    thread_efficiency=0.9,
    memory_gbps=40,
    activation_bytes=4,
)
TINY_SPEC = ModelSpec(n_layer=4, n_embd=128, n_head=4, block_size=128, vocab=4096)


def test_cpu_ranks_share_the_cores_and_keep_their_bubble():
    """Two ranks on two cores run as fast as the node allows; four take turns (twice the time per
    micro-batch); a pipeline's bubble is one micro-batch of every stage but the slowest, even when
    oversubscribed: (p - 1)/m of the busy time for equal stages, less when the head makes the last
    stage the slowest."""
    two = predict(TINY_SPEC, PlannedLayout(1, 1, 2, 8), CPU_NODE, 32, ranks_per_node=2)
    four = predict(TINY_SPEC, PlannedLayout(1, 1, 4, 8), CPU_NODE, 32, ranks_per_node=4)
    assert four.breakdown["compute_s"] == pytest.approx(two.breakdown["compute_s"], rel=1e-9)
    one = predict(TINY_SPEC, PlannedLayout(1, 1, 1, 8), CPU_NODE, 32, ranks_per_node=1)
    assert one.breakdown["compute_s"] > two.breakdown["compute_s"]  # threads scale worse than ranks

    def bubble_share(spec: ModelSpec, cluster: profiles.ClusterProfile, ranks: int) -> float:
        pipeline = predict(spec, PlannedLayout(1, 4, 1, 8), cluster, 32, ranks_per_node=ranks)
        busy = sum(pipeline.breakdown[k] for k in ("compute_s", "tp_s", "pp_p2p_s"))
        return pipeline.breakdown["bubble_s"] / busy

    equal_stages = ModelSpec(n_layer=8, n_embd=1024, n_head=8, block_size=128, vocab=8)  # 2 layers each
    no_head_cost = dataclasses.replace(profiles.load("a100"), micro_batch_overhead_us=0)  # on the last stage
    assert bubble_share(equal_stages, no_head_cost, 8) == pytest.approx(3 / 4, rel=1e-3)
    assert 0.1 < bubble_share(TINY_SPEC, CPU_NODE, 4) < 3 / 4  # the head's stage is the slowest
    assert (
        predict(TINY_SPEC, PlannedLayout(1, 1, 1, 8), profiles.load("a100"), 32).breakdown["optimizer_s"] == 0
    )


def test_calibration_fits_recover_the_constants_they_were_made_from():
    sustained, half, per_layer, head_eff, per_micro = 40e9, 30.0, 1e-3, 0.6, 2e-3

    def rate(h):
        return sustained * h / (h + half)

    times = {}
    for h in calibrate.HIDDEN_SIZES:
        for t in calibrate.TOKEN_COUNTS:
            block = per_layer + 3 * layer_forward_flops(calibrate._spec(h), t // calibrate.SEQUENCE) / rate(h)
            outside = per_micro + 3 * 2 * t * h * calibrate.VOCAB / (sustained * head_eff)  # one wide GEMM
            for n in calibrate.LAYERS:
                times[h, t, n] = n * block + outside
    got = calibrate.fit(times)
    assert got["sustained_flops"] == pytest.approx(sustained, rel=1e-6)
    assert got["half_size"] == pytest.approx(half, rel=1e-6)
    assert got["layer_overhead_s"] == pytest.approx(per_layer, rel=1e-6)
    assert got["head_efficiency"] == pytest.approx(head_eff, rel=1e-6)
    assert got["micro_batch_overhead_s"] == pytest.approx(per_micro, rel=1e-6)
    n, gbps, latency = 2, 3.0, 20.0
    rows = [
        {"ranks": n, "bytes": b, "time_us": 2 * (n - 1) * latency + 2 * (n - 1) / n * b / (gbps * 1e3)}
        for b in (4096, 65536, 1 << 20)
    ]
    assert calibrate.fit_allreduce(rows) == pytest.approx((gbps, latency), rel=1e-6)


def test_parallel_terms_recover_the_machine_that_ran_them(data_dir):
    """Measurements made up from a known profile: fitting them gives that profile's terms back
    (the machine's pace, threads, TP, oversubscription and the bubble, fitted in rounds)."""
    from hpcllm.data.tokens import open_prepared

    truth = dataclasses.replace(
        CPU_NODE,
        step_scale=1.4,
        thread_efficiency=0.6,
        tp_collective_us=300,
        oversubscribed_efficiency=0.8,
        bubble_fill=0.5,
    )
    spec = ModelSpec(
        vocab=open_prepared(data_dir, verify=False).vocab_size, **calibrate_runs.CALIBRATION_MODEL
    )
    layouts = calibrate_runs.calibration_layouts(2)

    def measure(variants, flags, steps, repeat):
        assert {name for name, _, _ in variants} == set(layouts)
        return {
            name: predict(
                spec, layout, truth, calibrate_runs.CALIBRATION_BATCH, ranks_per_node=layout.gpus
            ).tokens_per_s
            for name, layout in layouts.items()
        }

    start = {k: getattr(CPU_NODE, k) for k in profiles.ClusterProfile.__dataclass_fields__}
    terms, _ = calibrate_runs.parallel_terms(start, data_dir, measure, 30, 1, cores=2)
    for term in ("step_scale", "thread_efficiency", "oversubscribed_efficiency"):
        assert terms[term] == pytest.approx(getattr(truth, term), rel=1e-3), term
    assert terms["tp_collective_us"] == pytest.approx(300, rel=1e-3)
    assert terms["bubble_fill"] == pytest.approx(0.5, abs=1e-3)
    assert terms["pp_micro_batch_us"] == pytest.approx(0, abs=1)


def test_validation_statistics():
    assert validate.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert validate.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert validate.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ties: average ranks
    measured = {"tp=1,pp=1,dp=2,micro_batch=8": 9000.0, "tp=1,pp=4,dp=1,micro_batch=8": 4000.0}
    result = validate.compare(TINY_SPEC, CPU_NODE, 32, measured)
    assert result["spearman"] == pytest.approx(1) and result["best_in_top2"]
    assert result["predicted_best"] == "tp=1,pp=1,dp=2,micro_batch=8"
    # Rows the calibration fitted are flagged, and the statistics repeated without them.
    measured["tp=2,pp=1,dp=1,micro_batch=8"] = 6000.0
    split = validate.compare(TINY_SPEC, CPU_NODE, 32, measured, fitted={"tp=1,pp=4,dp=1,micro_batch=8"})
    assert [r["fitted"] for r in split["rows"]] == [False, True, False]
    assert split["held_out"]["layouts"] == 2 and split["layouts"] == 3
    # Re-anchoring: a profile calibrated at half this machine's speed is brought back by the
    # reference run measured now, whatever the layout of that run.
    now = dataclasses.replace(CPU_NODE, step_scale=2.0)
    name, ranks, flags = validate.reference_run(CPU_NODE)
    assert ranks >= 1 and flags[:2] == ["--tp", "1"] and "model.n_layer=4" in flags
    reference = validate._reference_layout()
    spec = ModelSpec(vocab=4096, **calibrate_runs.shape_of(CPU_NODE))
    at_now = predict(spec, reference, now, calibrate_runs.CALIBRATION_BATCH, ranks_per_node=reference.gpus)
    fast = validate.anchored(CPU_NODE, 4096, at_now.tokens_per_s)
    assert fast.step_scale == pytest.approx(2.0 * CPU_NODE.step_scale, rel=1e-6)
    layout = parse_layout("tp=2,pp=1,dp=2,micro_batch=4,zero=1,recompute=full,sequence_parallel=true", 32)
    assert parse_layout(layout_text(layout), 32) == layout
    assert layout_arguments(layout)[:4] == ["--tp", "2", "--pp", "1"]


def test_fully_sharded_and_hybrid_layouts_in_the_step_model():
    """zero=3 holds 16/dp bytes per parameter plus the units whole at once, and moves 1.5x the
    allreduce's bytes per micro-batch; hybrid sharding keeps its gathers inside a node (a100: 8
    GPUs a node, dp 16 over 2 nodes), so its gathers take less time than the world's."""
    spec = ModelSpec.of_preset("gpt2-350m")
    cluster = profiles.load("a100")

    def at(micro_batch=1, **fields):
        layout = PlannedLayout(1, 1, 16, micro_batch, **fields)
        return predict(spec, layout, cluster, 16 * micro_batch, ranks_per_node=8)

    zero1, world, node = at(zero=1), at(zero=3), at(zero=3, shard_group="node")
    assert world.breakdown["states_gib"] < zero1.breakdown["states_gib"] < at().breakdown["states_gib"]
    assert node.breakdown["states_gib"] > world.breakdown["states_gib"]  # sharded over 8, not 16
    assert node.breakdown["zero_gather_s"] < world.breakdown["zero_gather_s"]
    layout = parse_layout("tp=1,pp=1,dp=16,micro_batch=1,zero=3,shard_group=node", 16)
    assert layout.shard_group == "node" and parse_layout(layout_text(layout), 16) == layout
    assert "parallel.shard_group=node" in layout_arguments(layout)
    # A chunked loss: the head's logits of 1,024 tokens instead of the micro-batch's.
    whole, chunked = at(micro_batch=8), at(micro_batch=8, loss_chunk=1024)
    assert chunked.breakdown["logits_gib"] < whole.breakdown["logits_gib"] / 3
    assert parse_layout("tp=1,pp=1,dp=16,micro_batch=1,loss_chunk=1024", 16).loss_chunk == 1024


def test_peak_memory_of_a_layout_is_what_bench_memory_measures():
    """Every recomputation and ZeRO mode of the tiny model at dp = 4: the planner's bytes per rank
    (fp32 activations on a CPU profile) within 15% of `hpcllm bench memory`'s measured sum."""
    from hpcllm.bench import memory as bench_memory
    from hpcllm.training import config as config_mod

    config = config_mod.load(assignments=["model.preset=tiny", "train.micro_batch=8"])
    for row in bench_memory.run(config, vocab_size=4096, dp=4, steps=1):
        layout = PlannedLayout(1, 1, 4, 8, zero=row["zero"], recompute=row["recompute"])
        predicted = predict(TINY_SPEC, layout, CPU_NODE, 32, ranks_per_node=4).memory_gib_per_rank * GIB
        assert predicted == pytest.approx(row["peak_bytes"], rel=0.15), (layout, predicted, row["peak_bytes"])


def test_calibrate_then_plan_here_and_train_in_the_layout_it_picks(tmp_path, data_dir):
    """`plan calibrate` (short benchmark points) writes a profile that loads; `plan --cluster local`
    ranks the layouts of 2 ranks with it; `train --layout auto` under mpirun takes the first of them
    and logs why."""
    from hpcllm.data.tokens import open_prepared

    env = {**launch_env(), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    small = "n_layer=2,n_embd=32,n_head=2,block_size=32"  # the runs' shape (vocabulary: the data's): quick
    quick = ["--seconds", "0.02", "--steps", 20, "--repeat", 1, "--data", data_dir, "--model", small]
    calibrated = run_hpcllm(["plan", "calibrate", *quick], env=env, timeout=600)
    assert calibrated.returncode == 0, calibrated.stderr
    local = profiles.load(str(tmp_path / "config/hpcllm/profiles/local.yaml"))
    assert local.cores_per_node >= 1 and local.activation_bytes == 4
    assert local.peak_flops > 1e8 and 0 < local.gemm_efficiency and local.intra_node_gbps > 0
    assert 0 < local.step_scale and 0 < local.oversubscribed_efficiency <= 1 and 0 <= local.bubble_fill <= 1
    vocab = open_prepared(data_dir, verify=False).vocab_size
    model = f"n_layer=2,n_embd=32,n_head=2,block_size=32,vocab={vocab}"
    plan = ["plan", "--model", model, "--cluster", "local", "--gpus-per-node", 2, "--global-batch", 8]
    ranked = run_hpcllm([*plan, "--json", "--top", 1], env=env)
    assert ranked.returncode == 0, ranked.stderr
    best = json.loads(ranked.stdout)[0]
    run = tmp_path / "run"
    flags = ["train", "--data", data_dir, "--out", run, *TINY, "--steps", 2, "--layout", "auto"]
    trained = run_hpcllm(flags, ranks=2, env=env)
    assert trained.returncode == 0, trained.stderr
    expected = layout_text(PlannedLayout(**{k: best[k] for k in ("tp", "pp", "dp", "micro_batch", "zero")}))
    chosen = next(line for line in trained.stderr.splitlines() if "layout auto:" in line)
    assert expected in chosen and "predicted" in chosen, chosen
    # Starting from a Hugging Face folder: the planner's layout for the folder's shape is the one
    # the run takes (it used to be dropped when the folder's shape was applied).
    folder = tmp_path / "hf"
    assert run_hpcllm(["export", "--run", run, "--format", "hf", "--out", folder]).returncode == 0
    from_hf = tmp_path / "from-hf"
    started = run_hpcllm(
        [*flags[:4], from_hf, *TINY, "--steps", 1, "--layout", "auto", "--init-from", f"hf:{folder}"],
        ranks=2,
        env=env,
    )
    assert started.returncode == 0, started.stderr
    saved = yaml.safe_load((from_hf / "config.yaml").read_text())
    ran = {key: saved["parallel"][key] for key in ("tp", "pp", "zero")}
    ran["micro_batch"] = saved["train"]["micro_batch"]
    assert ran == {key: best[key] for key in ran}, (ran, best)
    assert saved["train"]["init_from"] == f"hf:{folder}" and saved["model"]["n_embd"] == 32
    assert_usage_error(
        run_hpcllm([*flags[:4], tmp_path / "other", "--layout", "auto", "--tp", 2]), "drop --tp"
    )


def test_the_planner_recommends_context_parallelism_when_only_it_fits():
    """A 131,072-token sequence on GPUs of 16 GB, one per node (no tensor parallelism inside a node):
    only layouts that split the sequence over cp ranks fit, and the best of them is one; cp divides
    the activations and the head's logits per rank; a layout names and runs it with parallel.cp."""
    cluster = dataclasses.replace(profiles.load("a100"), memory_gib=16)
    spec = dataclasses.replace(ModelSpec.of_preset("gpt2-350m"), block_size=131072)
    best = ranked(spec, cluster, 8, 1, 8)
    assert best and all(p.layout.cp > 1 for p in best)
    one = predict(spec, PlannedLayout(1, 1, 8, 1, 2, "full"), cluster, 8, ranks_per_node=1)
    four = predict(spec, PlannedLayout(1, 1, 2, 1, 2, "full", cp=4), cluster, 8, ranks_per_node=1)
    assert four.breakdown["activations_gib"] == pytest.approx(one.breakdown["activations_gib"] / 4)
    assert not one.fits and four.fits
    layout = parse_layout(layout_text(best[0].layout), 8, gpus=8)
    assert layout == best[0].layout and f"parallel.cp={layout.cp}" in layout_arguments(layout)
    # `train --layout auto` takes it, unless the run's settings cannot run with cp: then one line.
    shape = ["model.preset=gpt2-350m", "model.block_size=131072", "train.global_batch=8"]
    for dropout in (0.0, 0.1):
        config = config_mod.load(None, [*shape, f"model.dropout={dropout}"])
        problem = lambda layout, config=config: context_parallel_problem(config, layout.cp)  # noqa: E731
        if dropout:
            with pytest.raises(UsageError, match="cannot take: parallel.cp=.* not support model.dropout"):
                auto.choose(config, cluster, 8, 1, 50257, problem=problem)
            continue
        settings, _ = auto.choose(config, cluster, 8, 1, 50257, problem=problem)
        assert f"parallel.cp={best[0].layout.cp}" in settings
