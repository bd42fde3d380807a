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


def test_world_that_does_not_factor_is_a_usage_error():
    with pytest.raises(UsageError, match=r"world size 6 is not divisible by tp\*pp = 2\*2 = 4"):
        Layout.for_world(6, tp=2, pp=2)
    with pytest.raises(UsageError, match="tp must be at least 1"):
        Layout.for_world(4, tp=0)


def _check_grid(grid, comm):
    import torch

    layout = grid.layout
    rank = comm.Get_rank()
    assert tuple(grid.coords) == tuple(layout.coords(rank))
    # Each sub-communicator holds exactly the layout's group, ordered by the varying coordinate.
    for sub, expected in (
        (grid.tp_comm, layout.tp_group(rank)),
        (grid.dp_comm, layout.dp_group(rank)),
        (grid.pp_comm, layout.pp_group(rank)),
    ):
        assert sub.allgather(rank) == expected
    assert (grid.tp_comm.Get_rank(), grid.dp_comm.Get_rank(), grid.pp_comm.Get_rank()) == (
        grid.tp_rank,
        grid.dp_rank,
        grid.pp_rank,
    )
    # Horovod allreduce over this rank's DP process set sums only within the DP group.
    import horovod.torch as hvd

    process_set = grid.dp_process_set  # starts Horovod on first use
    # Horovod runs on mpi4py's world: same ranks, same size.
    assert (hvd.rank(), hvd.size()) == (rank, comm.Get_size())

    total = hvd.allreduce(torch.tensor([float(rank)]), op=hvd.Sum, process_set=process_set)
    assert total.item() == float(sum(layout.dp_group(rank)))
    # Every rank's view agrees with every other's.
    views = comm.allgather((rank, tuple(grid.coords)))
    assert views == [(r, tuple(layout.coords(r))) for r in range(layout.world)]


@pytest.mark.mpi(ranks=8, timeout=120, tp=2, pp=2)
def test_grid_2x2x2_on_8_ranks(grid, comm):
    assert (grid.layout.pp, grid.layout.dp, grid.layout.tp) == (2, 2, 2)
    _check_grid(grid, comm)


@pytest.mark.mpi(ranks=8, timeout=120, tp=1, pp=4)
def test_grid_4x2x1_on_8_ranks(grid, comm):
    assert (grid.layout.pp, grid.layout.dp, grid.layout.tp) == (4, 2, 1)
    _check_grid(grid, comm)
