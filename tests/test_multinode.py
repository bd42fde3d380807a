"""Many nodes on one machine: a real Slurm cluster of two virtual nodes (the plugin's test bed),
ranks that learn their node from MPI, and layouts across nodes that give the single-process losses."""

import os
import re
import subprocess
import sys
import time

import pytest
from conftest import TINY, assert_same_losses, copy_run_at, losses, run_hpcllm, sets, submit_job

from hpcllm.cluster.launcher import launch_env
from hpcllm.parallel.layout import Layout


@pytest.mark.mpi(ranks=4, nodes=2, timeout=120)
def test_ranks_learn_their_node_from_mpi_on_two_virtual_nodes(runtime, grid, comm):
    rank = comm.Get_rank()
    # Both virtual nodes have this machine's hostname: the node can only come from MPI.
    assert len(set(runtime.hostnames)) == 1
    assert runtime.node_of_rank == [0, 0, 1, 1] and runtime.node_count == 2
    assert runtime.node_index == int(os.environ["SLURM_NODEID"])
    assert (runtime.local_rank, runtime.local_size) == (rank % 2, 2)
    assert grid.node_comm.allgather(rank) == ([0, 1] if rank < 2 else [2, 3])
    # Horovod started with the grid runs across the nodes.
    import horovod.torch as hvd
    import torch

    assert hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum).item() == 4.0


def test_tp_groups_that_span_nodes_are_found():
    two_by_two = [0, 0, 1, 1]
    assert Layout.for_world(4, tp=2).tp_groups_across_nodes(two_by_two) == []
    assert Layout.for_world(4, tp=4).tp_groups_across_nodes(two_by_two) == [[0, 1, 2, 3]]
    # Three ranks per node: the second TP pair straddles nodes 0 and 1.
    assert Layout.for_world(6, tp=2).tp_groups_across_nodes([0, 0, 0, 1, 1, 1]) == [[2, 3]]


def test_layouts_across_two_nodes_match_one_process(slurm_cluster, data_dir, tmp_path):
    """dp4, dp2 x tp2, pp2 x dp2 and dp4 with hybrid sharding (zero=3, shard_group=node) on 2
    virtual nodes x 2 ranks (srun, PMIx, TCP between the nodes) give the single-process losses;
    `hpcllm info` shows the node map; dp4 reads data staged once per node into per-node directories."""
    cluster = slurm_cluster(nodes=2)
    env = launch_env(cluster.env)
    srun = ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks=4"]
    info = subprocess.run(
        [*srun, sys.executable, "-m", "hpcllm.cli", "info"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert info.returncode == 0, info.stderr
    assert "4 ranks on 2 node(s)" in info.stdout
    assert "node 0 (" in info.stdout and "): ranks 0-1" in info.stdout and "): ranks 2-3" in info.stdout

    steps = ["--steps", "20", "--set", "train.eval_every=0"]
    reference = tmp_path / "one"
    assert run_hpcllm(["train", "--data", data_dir, "--out", reference, *TINY, *steps]).returncode == 0
    staged = ["--set", f"data.stage_dir={tmp_path}/stage-{{node}}"]
    hybrid = ["--set", "parallel.zero=3", "--set", "parallel.shard_group=node"]
    layouts = (("dp4", staged), ("dp2xtp2", ["--tp", "2"]), ("pp2xdp2", ["--pp", "2"]), ("dp4-hsdp", hybrid))
    for name, flags in layouts:
        out = tmp_path / name
        command = [*srun, sys.executable, "-m", "hpcllm.cli", "train", "--data", str(data_dir)]
        command += ["--out", str(out), *map(str, TINY), *steps, *flags]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same_losses(losses(reference), losses(out), name)
        assert "(node 1, local rank 0/2)" in (out / "logs" / "rank-2.log").read_text()
        assert "span nodes" not in (out / "logs" / "rank-0.log").read_text()  # TP pairs inside a node
    # Hybrid sharding: shards over each node's 2 ranks (gathers on the node), copies across the 2 nodes.
    assert (
        "over 2 DP ranks of a node, replicated over 2 nodes"
        in (tmp_path / "dp4-hsdp" / "logs" / "rank-0.log").read_text()
    )
    source = (data_dir / "train.bin").read_bytes()
    for node in (0, 1):  # one copy per node, made by the node's first rank
        assert (tmp_path / f"stage-{node}" / "train.bin").read_bytes() == source
    assert not list(tmp_path.glob("stage-*/.*.partial"))


def test_a_stage_dir_that_cannot_be_written_is_one_line(data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_hpcllm(
        ["train", "--data", data_dir, "--out", tmp_path / "r", *TINY, "--steps", 1]
        + ["--set", f"data.stage_dir={blocker}/stage"],
        ranks=2,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"data.stage_dir: cannot copy the data to {blocker}/stage" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before the run directory was made


def _job_processes(job):
    """Processes still running for Slurm job `job`, on any virtual node."""
    import psutil

    alive = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("SLURM_JOB_ID") == job:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def test_a_job_that_loses_a_node_continues_on_the_nodes_left(slurm_cluster, data_dir, tmp_path):
    """Submitted with --nodes 1-2 it starts as dp4 on 2 nodes; node n2 then dies (every process on
    it SIGKILLed, the node DOWN). The job ends within 30 s leaving no process behind, continues in
    a new job on the one node left as dp2 (tp, pp kept), from the last complete checkpoint, and
    finishes with the losses of an uninterrupted dp2 run resumed from that checkpoint."""
    cluster = slurm_cluster(nodes=2)
    train_args = ["--data", data_dir, *TINY, "--steps", 60]
    train_args += sets("train.ckpt_every=10", "train.keep=10", "train.eval_every=0")
    job, _ = submit_job(cluster, tmp_path, *train_args, job_name="lose", nodes="1-2")
    run = tmp_path / f"job-{job}"
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "step-00000020").exists():  # the second checkpoint
            assert cluster.job_state(job) in ("PENDING", "RUNNING") and time.monotonic() < deadline
            time.sleep(0.2)
        assert "pp=1 x dp=4 x tp=1" in (run / "logs" / "rank-0.log").read_text()

        lost_at = time.monotonic()
        cluster.lose_node("n2")
        cluster.wait_job(job, timeout=30)
        print(f"job {job} ended {time.monotonic() - lost_at:.1f} s after its node was lost")
        assert not _job_processes(job)
        last_complete = (run / "checkpoints" / "latest").read_text().strip()

        log = (tmp_path / f"slurm-lose-{job}.out").read_text()
        assert "Node failure on n2" in log or "NODE FAILURE" in log, log
        continuation = re.search(r"hpcllm: continuing in job (\d+) \(restart 1 of 3\)", log)
        assert continuation, log
        next_job = continuation.group(1)
        assert cluster.wait_job(next_job, timeout=300) == "COMPLETED", (
            tmp_path / f"slurm-lose-{next_job}.out"
        ).read_text()
    finally:
        cluster.restore_node("n2")

    rank0 = (run / "logs" / "rank-0.log").read_text()
    assert f"resumed from {run}/checkpoints/{last_complete}" in rank0
    assert "pp=1 x dp=2 x tp=1" in rank0  # the continuation's layout, in the same log
    # The reference: the same checkpoint resumed by an uninterrupted dp2 run under mpirun.
    reference = copy_run_at(run, last_complete, tmp_path / "reference")
    proc = run_hpcllm(["train", "--out", reference, "--resume"], ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = losses(reference), losses(run)
    restart_step = int(last_complete.split("-")[1])
    assert min(expected) == restart_step + 1 and max(expected) == max(got) == 60
    for step, value in expected.items():
        assert abs(got[step] - value) <= 1e-5 * value, step
