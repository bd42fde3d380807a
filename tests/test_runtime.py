"""The rank-aware runtime, in real ranks and in a single process with no launcher."""

import json
import os
import subprocess
import sys

import pytest

from hpcllm.cluster.launcher import Launcher
from hpcllm.cluster.runtime import cpu_threads, setup_logging


@pytest.mark.mpi(ranks=2, timeout=60)
def test_runtime_two_ranks(runtime, comm):
    _check_runtime(runtime, comm, expected_size=2)


@pytest.mark.mpi(ranks=4, timeout=60)
def test_runtime_four_ranks(runtime, comm):
    _check_runtime(runtime, comm, expected_size=4)


def _check_runtime(runtime, comm, expected_size):
    assert runtime.launch.launcher is Launcher.OPENMPI
    assert runtime.size == runtime.launch.size == expected_size
    assert runtime.rank == comm.Get_rank() == runtime.launch.rank
    # One node here: every rank is local, local ranks are a permutation of 0..size-1.
    assert runtime.local_size == expected_size and runtime.node_index == 0
    assert sorted(comm.allgather(runtime.local_rank)) == list(range(expected_size))
    assert len(runtime.hostnames) == expected_size and runtime.node_count == 1
    assert runtime.node_of_rank == [0] * expected_size
    assert runtime.node_map() == [f"node 0 ({runtime.hostnames[0]}): ranks 0-{expected_size - 1}"]
    assert runtime.device.type == "cpu"
    # The node's cores are shared, never oversubscribed by threads.
    if "OMP_NUM_THREADS" not in os.environ:
        assert runtime.threads * runtime.local_size <= max(os.cpu_count(), runtime.local_size)
    # Same seed on every rank: identical random draws, so the full model initialises identically.
    import torch

    draws = comm.allgather(torch.rand(3).tolist())
    assert all(d == draws[0] for d in draws)


def test_runtime_plain_process_without_launcher(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "SLURM_", "PMI_"))}
    code = (
        "import json; from hpcllm.cluster import runtime; r = runtime.init(seed=3);"
        "print(json.dumps([r.launch.launcher.name, r.rank, r.size,"
        " r.local_rank, r.local_size, str(r.device)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["NONE", 0, 1, 0, 1, "cpu"]
    # A job without a model (prepare) has no device and never imports torch: 1.5 s per rank.
    code = (
        "import sys; from hpcllm.cluster import runtime; from hpcllm.data import prepare;"
        "r = runtime.init(model=False); print(r.device, r.threads >= 1, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "True", "False"]


@pytest.mark.parametrize(
    "env,local_size,expected",
    [({"OMP_NUM_THREADS": "3"}, 4, 3), ({"SLURM_CPUS_PER_TASK": "5"}, 2, 5), ({}, 1, None)],
)
def test_thread_count_respects_explicit_settings(env, local_size, expected):
    threads = cpu_threads(local_size, env)
    if expected is None:  # no setting: this process's allowed cores, shared by the local ranks
        expected = max(1, len(os.sched_getaffinity(0)) // local_size)
    assert threads == expected


@pytest.mark.mpi(ranks=2, timeout=60)
def test_every_rank_logs_to_its_file_and_only_rank_0_to_console(comm, mpi_tmp_path, capsys):
    import logging

    rank = comm.Get_rank()
    setup_logging(rank, mpi_tmp_path)
    logging.getLogger("hpcllm").info("hello from %d", rank)
    logging.getLogger("hpcllm").warning("warn from %d", rank)
    for handler in logging.getLogger("hpcllm").handlers:
        handler.flush()
    console = capsys.readouterr().err
    comm.Barrier()
    text = (mpi_tmp_path / "logs" / f"rank-{rank}.log").read_text()
    assert f"[rank {rank}] INFO hpcllm: hello from {rank}" in text
    if rank == 0:
        assert "[rank 0] hello from 0" in console
    else:
        assert "hello from" not in console and f"[rank {rank}] warn from {rank}" in console


# ---- GPUs per node (no GPU here: the rule is pure arithmetic over what CUDA would report) -----


def test_each_local_rank_gets_its_own_gpu_or_a_clear_refusal():
    from hpcllm.cluster.runtime import check_gpus_not_shared, gpu_for_local_rank
    from hpcllm.errors import UsageError

    assert [gpu_for_local_rank(r, 4, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [gpu_for_local_rank(r, 2, 8) for r in range(2)] == [0, 1]
    assert gpu_for_local_rank(3, 4, 1) == 0  # each rank sees its own single GPU (--gpus-per-task)
    with pytest.raises(UsageError, match="4 ranks on this node but 2 GPUs visible: two ranks would share"):
        gpu_for_local_rank(3, 4, 2)
    check_gpus_not_shared(["GPU-a", "GPU-b"], node=0)
    with pytest.raises(UsageError, match="local ranks 0 and 1 of node 3 see the same GPU"):
        check_gpus_not_shared(["GPU-a", "GPU-a"], node=3)
