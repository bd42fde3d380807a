"""Many nodes on one machine: a real Slurm cluster of two virtual nodes (the plugin's test bed),
ranks that learn their node from MPI, and layouts across nodes that give the single-process losses."""

import os
import subprocess
import sys

import pytest
from conftest import TINY, assert_same_losses, losses, run_hpcllm

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
    """dp4, dp2 x tp2 and pp2 x dp2 on 2 virtual nodes x 2 ranks (srun, PMIx, TCP between the
    nodes) give the single-process losses; `hpcllm info` shows the node map; dp4 reads data staged
    once per node into per-node directories."""
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
    for name, flags in (("dp4", staged), ("dp2xtp2", ["--tp", "2"]), ("pp2xdp2", ["--pp", "2"])):
        out = tmp_path / name
        command = [*srun, sys.executable, "-m", "hpcllm.cli", "train", "--data", str(data_dir)]
        command += ["--out", str(out), *map(str, TINY), *steps, *flags]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same_losses(losses(reference), losses(out), name)
        assert "(node 1, local rank 0/2)" in (out / "logs" / "rank-2.log").read_text()
        assert "span nodes" not in (out / "logs" / "rank-0.log").read_text()  # TP pairs inside a node
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
