"""The CUDA path, on the GPUs present: run by `make gpu-check` (`pytest -m gpu`) on a GPU node.

Without CUDA every test here is skipped with the reason; nothing is mocked. The logic of the GPU
paths (the torch.distributed backends for TP and PP, the step's host reads) runs on CPU with gloo in
tests/test_pipeline.py and tests/test_train.py on every commit.
"""

import importlib.util
import os

import pytest
import torch
from conftest import TINY, assert_same_losses, launch_env, losses, run_hpcllm, sets

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
HOROVOD = importlib.util.find_spec("horovod") is not None

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="no CUDA device here")]


def train_run(data_dir, out, ranks=None, *flags, cpu=False):
    env = launch_env() | ({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})
    command = ["train", "--data", data_dir, "--out", out, *TINY, "--steps", 20, *sets("train.eval_every=0")]
    proc = run_hpcllm(command + [str(f) for f in flags], ranks=ranks, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(out), (out / "logs" / "rank-0.log").read_text()


@pytest.fixture(scope="module")
def on_cpu(data_dir, tmp_path_factory):
    return train_run(data_dir, tmp_path_factory.mktemp("cpu") / "run", cpu=True)[0]


def test_one_gpu_in_fp32_gives_the_cpu_losses(data_dir, tmp_path, on_cpu):
    got, log = train_run(data_dir, tmp_path / "gpu", None, *sets("train.tf32=false"))
    assert "device cuda:0" in log
    assert_same_losses(on_cpu, got, "one GPU, fp32")


def test_one_gpu_in_bf16_trains(data_dir, tmp_path, on_cpu):
    got, _ = train_run(data_dir, tmp_path / "bf16", None, *sets("train.dtype=bfloat16"))
    assert all(torch.isfinite(torch.tensor(v)) for v in got.values())
    assert abs(got[1] - on_cpu[1]) < 0.05 * on_cpu[1]  # bf16 rounding, same model and data
    assert got[max(got)] < got[1]


@pytest.mark.skipif(GPUS < 2, reason="tensor and pipeline parallelism need two GPUs (one rank per GPU)")
def test_tp2_and_pp2_over_nccl_give_the_one_process_losses(data_dir, tmp_path, on_cpu):
    fp32 = sets("train.tf32=false")
    for name, flags in (("tp2", ["--tp", 2]), ("pp2", ["--pp", 2])):
        got, log = train_run(data_dir, tmp_path / name, 2, *flags, *fp32)
        assert "tensor parallel torch (nccl)" in log or "pipeline torch (nccl)" in log, name
        assert_same_losses(on_cpu, got, name)


@pytest.mark.skipif(GPUS < 2 or not HOROVOD, reason="data parallelism needs two GPUs and Horovod (with NCCL)")
def test_dp2_over_horovod_nccl_gives_the_one_process_losses(data_dir, tmp_path, on_cpu):
    got, _ = train_run(data_dir, tmp_path / "dp2", 2, *sets("train.tf32=false"))
    assert_same_losses(on_cpu, got, "dp2")


def test_two_ranks_on_one_gpu_are_refused(data_dir, tmp_path):
    if GPUS != 1 or os.environ.get("CUDA_VISIBLE_DEVICES", "x") == "":
        pytest.skip("needs exactly one visible GPU")
    proc = run_hpcllm(["train", "--data", data_dir, "--out", tmp_path / "r", *TINY, "--steps", 1], ranks=2)
    assert proc.returncode == 2 and "see the same GPU" in proc.stderr
