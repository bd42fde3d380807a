"""A real one-node Slurm cluster on loopback, for tests: munged, slurmctld and slurmd from the
distribution's packages, configured in a temporary directory, started and stopped by the fixture.

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
    def __init__(self, cpus: int | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="hpcllm-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or (os.cpu_count() or 2)
        self.processes: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = os.environ | {"SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir()
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        self.conf.write_text(
            f"""ClusterName=hpcllmtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
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
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
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
        self._spawn(["slurmd", "-D", "-f", str(self.conf)])
        self._wait_for(self._node_idle, timeout, "slurmd to register as idle")
        return self

    def _spawn(self, command: list[str]) -> None:
        log = open(self.root / f"{command[0]}.out", "wb")  # noqa: SIM115 - lives with the process
        self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _node_idle(self) -> bool:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return state.returncode == 0 and state.stdout.strip().startswith("idle")

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

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.processes.clear()
