"""Pipeline parallelism: stage partition, schedules against the single-process run, 3D layouts,
tied-embedding copies, resharding checkpoints across pipeline sizes, and bad layouts."""

import json
import shutil

import pytest
from conftest import TINY, assert_same_losses, losses, run_hpcllm, sets
from safetensors.torch import load_file

from hpcllm.errors import UsageError
from hpcllm.parallel.pipeline.partition import balanced_stages, parse_stage_layers

PP_MODEL = [*TINY, *sets("model.n_layer=4", "train.eval_every=0")]


def test_stages_balance_parameters_with_embedding_first_and_head_last():
    assert balanced_stages([10] * 4, 0, 0, 2) == [2, 2]
    assert balanced_stages([10] * 4, 0, 0, 4) == [1, 1, 1, 1]
    # A heavy embedding on the first stage pushes layers to the later ones.
    assert balanced_stages([10] * 6, 25, 0, 2) == [2, 4]
    assert balanced_stages([10] * 6, 0, 25, 2) == [4, 2]
    assert sum(balanced_stages([3, 9, 1, 7, 2, 8, 5], 4, 6, 3)) == 7


def test_more_stages_than_layers_and_bad_overrides_are_usage_errors():
    with pytest.raises(UsageError, match="pp = 5 stages but only 4 layers"):
        balanced_stages([1] * 4, 0, 0, 5)
    with pytest.raises(UsageError, match="must give 2 positive counts summing to n_layer = 4"):
        parse_stage_layers("3,2", 4, 2)
    assert parse_stage_layers("3,1", 4, 2) == [3, 1]


def run_layout(data, out, steps, ranks=None, *flags):
    proc = run_hpcllm(
        ["train", "--data", data, "--out", out, *PP_MODEL, "--steps", steps, *flags], ranks=ranks
    )
    assert proc.returncode == 0, proc.stderr
    return losses(out)


def test_pp2_and_pp4_with_both_schedules_match_pp1(data_dir, tmp_path):
    reference = run_layout(data_dir, tmp_path / "pp1", 20)
    for pp in (2, 4):
        for schedule in ("1f1b", "gpipe"):
            out = tmp_path / f"pp{pp}-{schedule}"
            got = run_layout(data_dir, out, 20, pp, "--pp", pp, *sets(f"parallel.schedule={schedule}"))
            assert_same_losses(reference, got, out.name)
            # The tied embedding's copies on the first and last stage never drift apart.
            ckpt = out / "checkpoints" / "step-00000020"
            first = load_file(ckpt / "shard-pp0-tp0.safetensors")
            last = load_file(ckpt / f"shard-pp{pp - 1}-tp0.safetensors")
            assert (first["model.wte.weight"] == last["model.wte.weight"]).all()


def test_3d_layouts_and_horovod_paths_through_the_pipeline_match_one_process(data_dir, tmp_path):
    """2x2x2 on 8 ranks, and two layouts that used to hang or crash: Horovod TP process sets with
    pp > 1 (created lazily inside the first forward, they deadlocked the stages; now static, made
    with the grid), and a pipeline reducing gradients every micro-batch (Horovod raised 'Gradients
    were computed more than backward_passes_per_step times')."""
    reference = run_layout(data_dir, tmp_path / "one", 5)
    got = run_layout(data_dir, tmp_path / "3d", 5, 8, "--pp", 2, "--tp", 2)
    assert_same_losses(reference, got, "2x2x2")
    log = (tmp_path / "3d" / "logs" / "rank-0.log").read_text()
    assert "pp=2 x dp=2 x tp=2" in log
    hvd_tp = sets("parallel.tp_backend=horovod")
    got = run_layout(data_dir, tmp_path / "hvd-tp", 5, 4, "--tp", 2, "--pp", 2, *hvd_tp)
    assert_same_losses(reference, got, "pp2 x tp2, TP over Horovod")
    assert "data parallel horovod (gloo)" in log  # horovod.controller=auto on CPU
    # Horovod's MPI controller (auto's choice on CUDA) gives the same losses.
    every = sets("parallel.reduce_every=1", "horovod.controller=mpi")
    got = run_layout(data_dir, tmp_path / "every", 5, 4, "--pp", 2, *every)
    assert_same_losses(reference, got, "pp2 x dp2, gradients reduced every micro-batch, Horovod on MPI")
    assert "data parallel horovod (mpi)" in (tmp_path / "every" / "logs" / "rank-0.log").read_text()


def test_torch_distributed_backends_match_one_process(data_dir, tmp_path):
    """parallel.tp_backend=torch and pp_backend=torch, the GPU paths (NCCL there), run here on
    gloo: tp 2, pp 2 and pp 2 x tp 2 give the single-process losses."""
    reference = run_layout(data_dir, tmp_path / "one", 5)
    torch_backends = sets("parallel.tp_backend=torch", "parallel.pp_backend=torch")
    for name, ranks, layout, engines in (
        ("tp2", 2, ["--tp", 2], "tensor parallel torch (gloo), pipeline -"),
        ("pp2", 2, ["--pp", 2], "tensor parallel -, pipeline torch (gloo)"),
        ("pp2xtp2", 4, ["--pp", 2, "--tp", 2], "tensor parallel torch (gloo), pipeline torch (gloo)"),
    ):
        got = run_layout(data_dir, tmp_path / name, 5, ranks, *layout, *torch_backends)
        assert_same_losses(reference, got, name)
        assert engines in (tmp_path / name / "logs" / "rank-0.log").read_text(), name


def test_checkpoint_saved_at_pp2_resumes_at_pp1(data_dir, tmp_path):
    full = tmp_path / "pp2"
    reference = run_layout(data_dir, full, 12, 2, "--pp", 2, *sets("train.ckpt_every=6", "train.keep=5"))
    crashed = tmp_path / "resumed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-00000012")
    (crashed / "checkpoints" / "latest").write_text("step-00000006\n")
    proc = run_hpcllm(["train", "--out", crashed, "--resume", "--pp", 1])
    assert proc.returncode == 0, proc.stderr
    got = losses(crashed)
    for step in range(7, 13):
        assert abs(got[step] - reference[step]) <= 1e-3 * reference[step], step
    manifest = json.loads((crashed / "checkpoints" / "step-00000012" / "manifest.json").read_text())
    assert manifest["layout"]["pp"] == 1


def test_fewer_micro_batches_than_stages_warns_about_the_bubble(data_dir, tmp_path):
    out = tmp_path / "bubble"
    # global 8 / micro 4 = 2 micro-batches for 4 stages.
    run_layout(data_dir, out, 2, 4, "--pp", 4, *sets("train.micro_batch=4"))
    log = (out / "logs" / "rank-0.log").read_text()
    assert "only 2 micro-batches per step for 4 pipeline stages" in log and "idle 60%" in log


def test_more_stages_than_layers_exits_2(data_dir, tmp_path):
    proc = run_hpcllm(["train", "--data", data_dir, "--out", tmp_path / "r", *TINY, "--pp", 4], ranks=4)
    assert proc.returncode == 2
    assert "pp = 4 stages but model.n_layer = 2" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.mpi(ranks=2, timeout=120, pp=2)
def test_1f1b_keeps_at_most_pp_micro_batches_alive(grid):
    from contextlib import nullcontext

    import torch

    from hpcllm.model.gpt import GPT, GPTShape
    from hpcllm.model.partition import plan_stages
    from hpcllm.parallel.pipeline.schedules import PipelineStage

    shape = GPTShape(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=8)
    from hpcllm.batch import Batch

    batches = [Batch(torch.randint(0, 20, (2, 8)), torch.randint(0, 20, (2, 8))) for _ in range(6)]
    live = {}
    for schedule in ("1f1b", "gpipe"):
        layers = plan_stages(shape, 2).layer_range(grid.pp_rank)
        model = GPT(shape, 0, layers, grid.is_first_stage, grid.is_last_stage)
        stage = PipelineStage(model, grid, schedule, (2, 8, 8), nullcontext, torch.device("cpu"))
        live[schedule] = stage.train_step(batches, 1 / (6 * 2 * 8)).max_live_activations
    assert live["gpipe"] == 6
    assert live["1f1b"] == 2 - grid.pp_rank  # stage 0 holds 2 (= pp), the last stage 1
