"""Horovod's Gloo controller under an MPI launch: the rendezvous `horovodrun` would otherwise provide.

With `horovod.controller = gloo` Horovod's background thread negotiates and reduces over Gloo's
TCP pairs and never calls MPI. The main thread's mpi4py collectives (tensor, pipeline and context
parallelism, loss averages) are then the only blocking MPI calls a rank makes, so no two threads
ever wait inside the MPI library at once (docs/reliability.md, "The tp x dp stall").

Gloo finds its peers through a key-value store: rank 0 serves Horovod's own rendezvous server for
the few seconds `hvd.init` takes, every rank learns its address over MPI, and each rank tells
Horovod its place (rank, rank on its host, host index) through the environment Horovod reads.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from hpcllm.cluster.runtime import every_rank_checks
from hpcllm.errors import UsageError

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def _interface_with(address: str) -> str | None:
    """The network interface that holds IPv4 `address` on this host, if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None


def _address_and_interface(one_host: bool, env: dict[str, str]) -> tuple[str, str]:
    """(the address peers reach this rank at, the interface Gloo binds): loopback when every rank
    shares this host; otherwise HOROVOD_GLOO_IFACE, or the interface holding the host name's address."""
    if one_host:
        return "127.0.0.1", "lo"
    address = socket.gethostbyname(socket.gethostname())
    interface = env.get("HOROVOD_GLOO_IFACE") or _interface_with(address)
    if interface is None or address.startswith("127."):
        raise UsageError(
            f"horovod.controller=gloo across hosts: this host's name resolves to {address}, which other "
            "nodes cannot reach; fix: set HOROVOD_GLOO_IFACE to the interface the nodes share (ib0, eth0), "
            "or use horovod.controller=mpi"
        )
    return address, interface


def _places(hosts: list[str]) -> list[dict[str, int]]:
    """Every rank's place as Horovod counts it: its index among its host's ranks (local), and among
    the ranks with the same local index (cross)."""
    on_host: Counter[str] = Counter()
    local = []
    for host in hosts:
        local.append(on_host[host])
        on_host[host] += 1
    with_local: Counter[int] = Counter()
    cross = []
    for index in local:
        cross.append(with_local[index])
        with_local[index] += 1
    return [
        {
            "local_rank": local[rank],
            "local_size": on_host[host],
            "cross_rank": cross[rank],
            "cross_size": with_local[local[rank]],
        }
        for rank, host in enumerate(hosts)
    ]


def hosts(comm: Any) -> list[str]:
    """Collective: every rank's host name, in rank order."""
    return comm.allgather(socket.gethostname())


def open_rendezvous(
    comm: Any, hosts: list[str], env: dict[str, str], timeout_s: float
) -> tuple[dict[str, str], Callable[[], None]]:
    """Collective: start rank 0's rendezvous server for the ranks on `hosts` (`hosts(comm)`); returns
    the environment that points this rank's
    Horovod at it (set it before `hvd.init`), and `close`, to call on every rank once `hvd.init`
    has returned on every rank. `timeout_s` (at least 300 s) bounds every Gloo operation: Horovod's
    default, 30 s, ends a run whose rank is paused for longer (by gdb writing the stall watchdog's
    native stacks, say) before the watchdog can report where its ranks wait. A peer that dies
    closes its connections, which Gloo notices at once."""
    rank, size = comm.Get_rank(), comm.Get_size()
    one_host = len(set(hosts)) == 1
    address, interface = every_rank_checks(comm, lambda: _address_and_interface(one_host, env))
    places = _places(hosts)
    server = _serve(hosts, places) if rank == 0 else None
    server_address, port = comm.bcast((address, server[1] if server else 0), root=0)
    place = places[rank]
    rendezvous = {
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": server_address,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_GLOO_IFACE": interface,
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(max(300, round(timeout_s))),
        "HOROVOD_HOSTNAME": hosts[rank],
        "HOROVOD_RANK": str(rank),
        "HOROVOD_SIZE": str(size),
        **{f"HOROVOD_{key.upper()}": str(value) for key, value in place.items()},
    }

    def close() -> None:
        comm.Barrier()  # every rank is through hvd.init: nobody asks the store anything more
        if server is not None:
            server[0].stop()

    return rendezvous, close


def _serve(hosts: list[str], places: list[dict[str, int]]) -> tuple[Any, int]:
    """Rank 0: Horovod's rendezvous server, listening, told every rank's place."""
    from horovod.runner.common.util.hosts import SlotInfo
    from horovod.runner.http.http_server import RendezvousServer

    server = RendezvousServer()
    port = server.start()
    size = len(hosts)
    server.init(
        [SlotInfo(hostname=host, rank=rank, size=size, **places[rank]) for rank, host in enumerate(hosts)]
    )
    return server, port
