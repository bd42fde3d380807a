"""The pp × dp × tp grid: the rank formula, the sub-communicators, and Horovod DP process sets."""

import pytest

from hpcllm.errors import UsageError
from hpcllm.parallel.grid import Layout


@pytest.mark.parametrize("pp,dp,tp", [(2, 2, 2), (4, 2, 1), (1, 8, 1), (1, 1, 8), (2, 1, 4)])
def test_layout_rank_formula_round_trips(pp, dp, tp):
    layout = Layout.for_world(pp * dp * tp, tp=tp, pp=pp)
    assert (layout.pp, layout.dp, layout.tp) == (pp, dp, tp)
    for rank in range(layout.world):
        c = layout.coords(rank)
        assert rank == (c.pp * dp + c.dp) * tp + c.tp == layout.rank(*c)


def test_layout_groups_2x2x2():
    layout = Layout.for_world(8, tp=2, pp=2)
    # TP fastest: neighbours share a TP group; DP strides by tp; PP strides by dp*tp.
    assert layout.tp_group(5) == [4, 5]
    assert layout.dp_group(5) == [5, 7]
    assert layout.pp_group(5) == [1, 5]
    assert layout.all_dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_context_parallel_ranks_sit_between_tp_and_dp_and_reduce_with_dp():
    """pp 2 × dp 2 × cp 2 × tp 2: CP varies after TP; the DP group (gradient reduction) is dp × cp."""
    layout = Layout.for_world(16, tp=2, pp=2, cp=2)
    assert (layout.dp, layout.replicas, str(layout)) == (2, 4, "pp=2 x dp=2 x cp=2 x tp=2")
    for rank in range(16):
        c = layout.coords(rank)
        assert rank == ((c.pp * 2 + c.dp) * 2 + c.cp) * 2 + c.tp == layout.rank(*c)
    assert layout.tp_group(5) == [4, 5]
    assert layout.all_cp_groups()[:2] == [[0, 2], [1, 3]]
    assert layout.dp_group(5) == [1, 3, 5, 7]
    assert layout.pp_group(5) == [5, 13]
    with pytest.raises(UsageError, match=r"tp\*pp\*cp = 2\*1\*2 = 4"):
        Layout.for_world(6, tp=2, cp=2)


def test_world_that_does_not_factor_is_a_usage_error():
    with pytest.raises(UsageError, match=r"world size 6 is not divisible by tp\*pp = 2\*2 = 4"):
        Layout.for_world(6, tp=2, pp=2)
    with pytest.raises(UsageError, match="tp must be at least 1"):
        Layout.for_world(4, tp=0)


# Megatron's rank order, written out: TP fastest, then DP, then PP (rank -> (pp, dp, tp)).
COORDS_2x2x2 = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
COORDS_4x2x1 = [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (2, 0, 0), (2, 1, 0), (3, 0, 0), (3, 1, 0)]


def _peers(table, rank, axis):
    """The ranks that share every coordinate of `rank` but `axis`, in order of that coordinate."""
    mine = table[rank]
    same = [r for r, c in enumerate(table) if all(c[i] == mine[i] for i in range(3) if i != axis)]
    return sorted(same, key=lambda r: table[r][axis])


def _check_grid(grid, comm, table):
    import torch

    rank = comm.Get_rank()
    assert tuple(grid.coords)[:3] == table[rank] and grid.coords.cp == 0
    assert (grid.pp_rank, grid.dp_rank, grid.tp_rank) == table[rank]
    # Each sub-communicator holds exactly the ranks that differ along its axis, ordered along it.
    for sub, axis in ((grid.pp_comm, 0), (grid.dp_comm, 1), (grid.tp_comm, 2)):
        assert sub.allgather(rank) == _peers(table, rank, axis)
        assert sub.Get_rank() == table[rank][axis]
    # Horovod was started with the grid, on mpi4py's world: same ranks, same size.
    import horovod.torch as hvd

    assert hvd.is_initialized() and (hvd.rank(), hvd.size()) == (rank, comm.Get_size())
    # Allreduce over this rank's static DP process set sums only within the DP group.
    total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum, process_set=grid.dp_process_set)
    assert total.item() == float(sum(_peers(table, rank, 1)))
    # Every rank's view agrees with the table.
    assert comm.allgather(tuple(grid.coords)[:3]) == table


@pytest.mark.mpi(ranks=8, timeout=120, tp=2, pp=2)
def test_grid_2x2x2_on_8_ranks(grid, comm):
    assert (grid.layout.pp, grid.layout.dp, grid.layout.tp) == (2, 2, 2)
    _check_grid(grid, comm, COORDS_2x2x2)
    # The tied-embedding group joins the first and last stage of each pipeline; nobody else.
    assert grid.embedding_comm is not None and grid.embedding_comm.allgather(comm.Get_rank()) == _peers(
        COORDS_2x2x2, comm.Get_rank(), 0
    )


@pytest.mark.mpi(ranks=8, timeout=120, tp=1, pp=4)
def test_grid_4x2x1_on_8_ranks(grid, comm):
    assert (grid.layout.pp, grid.layout.dp, grid.layout.tp) == (4, 2, 1)
    _check_grid(grid, comm, COORDS_4x2x1)
    holds_embedding = grid.pp_rank in (0, 3)
    assert (grid.embedding_comm is not None) == holds_embedding
