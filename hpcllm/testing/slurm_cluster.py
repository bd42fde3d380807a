"""A real Slurm cluster on loopback, for tests: munged, slurmctld and one slurmd per node from the
distribution's packages, configured in a temporary directory, started and stopped by the fixture.

With `nodes=N > 1` the nodes are virtual: N slurmd daemons on this machine (`slurmd -N nI`), each
with its own port, spool, log and TmpFS directory (`%n`; without a per-node TmpFS the PMIx client
directories of two nodes collide and every `srun --mpi=pmix` step fails). OpenMPI's shared-memory
transport crashes between ranks of two virtual nodes, so `env` selects TCP over loopback.

Works as root without cgroups (proctrack/linuxproc, task/none). Credentials expire after 10 s
(`cred_expire`, default 120), which is also how long a requeued job waits before it starts again:
starting it earlier by hand races with slurmd revoking the previous run's credential.
Every client command must see
`SLURM_CONF` (without it Slurm looks its configuration up in DNS and fails): use `cluster.env`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "squeue")


def missing_binaries() -> list[str]:
    return [name for name in NEEDED if shutil.which(name) is None]


def unavailable() -> str:
    """Why a local cluster cannot start here ("" when it can)."""
    missing = missing_binaries()
    if missing:
        return f"SLURM CLUSTER NOT STARTED: {', '.join(missing)} not installed (`make setup` installs them)"
    if os.geteuid() != 0:
        return "SLURM CLUSTER NOT STARTED: the local cluster runs slurmd as root"
    return ""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalSlurmCluster:
    def __init__(self, cpus: int | None = None, nodes: int = 1):
        self.root = Path(tempfile.mkdtemp(prefix="hpcllm-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or (os.cpu_count() or 2)
        self.nodes = nodes
        # One node is this host itself; several are virtual nodes n1..nN on it.
        self.node_names = [self.host] if nodes == 1 else [f"n{i}" for i in range(1, nodes + 1)]
        self.processes: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = os.environ | {"SLURM_CONF": str(self.conf)}
        if nodes > 1:
            self.env |= {"OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo"}
        self._others: dict[int, LocalSlurmCluster] = {}

    def __call__(self, nodes: int = 1) -> LocalSlurmCluster:
        """The session's cluster of `nodes` nodes: this one, or another started on first use (and
        stopped with this one)."""
        if nodes == self.nodes:
            return self
        if nodes not in self._others:
            self._others[nodes] = LocalSlurmCluster(self.cpus, nodes=nodes).start()
        return self._others[nodes]

    def _write_config(self) -> None:
        for sub in ("state", "munge"):
            (self.root / sub).mkdir()
        for name in self.node_names:
            for sub in ("spool", "tmp"):
                (self.root / f"{sub}-{name}").mkdir()
        ctld_port, *slurmd_ports = _free_ports(1 + self.nodes)
        r = self.root
        nodes = ",".join(self.node_names)
        node_lines = "\n".join(
            f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus} State=UNKNOWN"
            for name, port in zip(self.node_names, slurmd_ports, strict=True)
        )
        self.conf.write_text(
            f"""ClusterName=hpcllmtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_ports[0]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
TmpFS={r}/tmp-%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
SlurmdParameters=config_overrides
{node_lines}
PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""
        )

    def start(self, timeout: float = 60.0) -> LocalSlurmCluster:
        self._write_config()
        r = self.root
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn(
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={r}/munge/munge.socket",
                f"--pid-file={r}/munge/munged.pid",
                f"--seed-file={r}/munge/seed",
                f"--log-file={r}/munge/munged.log",
            ]
        )
        self._wait_for(lambda: (r / "munge" / "munge.socket").exists(), timeout, "munged")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for name in self.node_names:
            self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", name], log_name=f"slurmd-{name}")
        self._wait_for(self._nodes_idle, timeout, "every slurmd to register as idle")
        return self

    def _spawn(self, command: list[str], log_name: str | None = None) -> None:
        log = open(self.root / f"{log_name or command[0]}.out", "wb")  # noqa: SIM115 - lives with the process
        self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _nodes_idle(self) -> bool:
        state = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True
        )
        states = state.stdout.split()
        return (
            state.returncode == 0 and len(states) == self.nodes and all(s.startswith("idle") for s in states)
        )

    def _wait_for(self, ready, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                    for f in sorted(self.root.glob("**/*.log"))
                )
                self.stop()
                raise RuntimeError(f"local Slurm cluster: waiting for {what} failed (exited: {dead})\n{logs}")
            time.sleep(0.2)

    def _slurmd(self, name: str) -> subprocess.Popen | None:
        return next((p for p in self.processes if p.args[-2:] == ["-N", name] and p.poll() is None), None)

    def lose_node(self, name: str) -> None:
        """What a node that loses power looks like to the rest of the cluster: its slurmd, its
        slurmstepd daemons and every job process under them are SIGKILLed at once, and the node is
        set DOWN (as slurmctld would after `SlurmdTimeout`). `restore_node` brings it back."""
        import psutil

        from hpcllm.testing.ranks import kill_all

        slurmd = self._slurmd(name)
        if slurmd is None:
            raise ValueError(f"no running slurmd for node {name!r} (nodes: {', '.join(self.node_names)})")
        slurmd.kill()
        slurmd.wait()
        self.processes.remove(slurmd)
        # A node's slurmstepd daemons are reparented to init; they keep the node's log file open.
        log = str(self.root / f"slurmd-{name}.log")
        doomed = []
        for proc in psutil.process_iter():
            try:
                if proc.name().startswith("slurmstepd") and any(f.path == log for f in proc.open_files()):
                    doomed += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
        kill_all(doomed, timeout=10)
        self.scontrol("update", f"nodename={name}", "state=down", "reason=lost by test")

    def restore_node(self, name: str, timeout: float = 60.0) -> None:
        """Start the slurmd of a node taken by `lose_node` again and return it to service."""
        if self._slurmd(name) is None:
            self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", name], log_name=f"slurmd-{name}")
        self.scontrol("update", f"nodename={name}", "state=resume")
        self._wait_for(self._nodes_idle, timeout, f"node {name} to return to service")

    def scontrol(self, *args: str) -> str:
        done = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def job_state(self, job: str) -> str:
        out = subprocess.run(
            ["scontrol", "show", "job", job], env=self.env, capture_output=True, text=True
        ).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_job(
        self,
        job: str,
        states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
        timeout: float = 300.0,
    ) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job)) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still {state} after {timeout:.0f} s")
            time.sleep(0.5)
        return state

    def _cancel_jobs(self, timeout: float = 20.0) -> None:
        """Cancel every job (steps and batch scripts too) while slurmctld still runs: a daemon
        stopped under a running job leaves its slurmstepd and ranks behind."""
        if not self.processes or self.processes[0].poll() is not None:
            return
        subprocess.run(["scancel", "--quiet", "--full", "--user", "root"], env=self.env, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
            if queue.returncode != 0 or not queue.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        for other in self._others.values():
            other.stop()
        self._others.clear()
        self._cancel_jobs()
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.processes.clear()
