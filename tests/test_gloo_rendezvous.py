"""Horovod's Gloo rendezvous under an MPI launch: every rank's place as Horovod counts it, the
address and interface Gloo binds, and the refusals (one line each). The collective part runs in
every training test with dp > 1 on CPU (horovod.controller=auto is gloo there)."""

from __future__ import annotations

import socket

import pytest

from hpcllm.errors import UsageError
from hpcllm.parallel import gloo_rendezvous
from hpcllm.training.plan import _controller


def test_places_count_ranks_per_host_and_across_hosts_as_horovodrun_does():
    places = gloo_rendezvous._places(["a", "a", "b", "b", "b"])
    assert [p["local_rank"] for p in places] == [0, 1, 0, 1, 2]
    assert [p["local_size"] for p in places] == [2, 2, 3, 3, 3]
    # cross: the ranks holding the same local index, one per host
    assert [p["cross_rank"] for p in places] == [0, 0, 1, 1, 0]
    assert [p["cross_size"] for p in places] == [2, 2, 2, 2, 1]


def test_one_host_uses_the_loopback_and_several_need_a_reachable_address(monkeypatch):
    assert gloo_rendezvous._address_and_interface(True, {}) == ("127.0.0.1", "lo")
    assert gloo_rendezvous._interface_with("127.0.0.1") == "lo"
    assert gloo_rendezvous._interface_with("192.0.2.1") is None  # TEST-NET-1: nobody's address
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    with pytest.raises(UsageError, match="set HOROVOD_GLOO_IFACE to the interface the nodes share"):
        gloo_rendezvous._address_and_interface(False, {"HOROVOD_GLOO_IFACE": "eth0"})


def test_auto_is_mpi_on_cuda_or_for_hierarchical_allreduce_and_left_to_the_hosts_on_cpu():
    assert _controller("auto", "cpu", False) == "auto"  # gloo on one host, mpi across (test_multinode)
    assert _controller("auto", "cuda", False) == "mpi"
    assert _controller("auto", "cpu", True) == "mpi"
    assert _controller("mpi", "cpu", False) == "mpi"
    with pytest.raises(UsageError, match="hierarchical_allreduce needs Horovod's MPI controller"):
        _controller("gloo", "cpu", True)
