"""Slurm: hostlists, and batch scripts rendered from the templates in `slurm/`.

Everything a user types that ends up in a script is validated first (job names, partitions and
accounts are plain identifiers; times are Slurm time formats) and quoted when it is inserted, so
nothing user-supplied reaches the shell unquoted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from hpcllm.errors import UsageError

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm"
TEMPLATES = ("gpu", "gpu-mpirun", "cpu", "array")

# ---- hostlists ----------------------------------------------------------------------------


def expand_hostlist(text: str) -> list[str]:
    """`gpu[01-03,07],login1` → gpu01 gpu02 gpu03 gpu07 login1 (Slurm's compressed hostlist form),
    by the well-kept python-hostlist package; a malformed list is one line saying so."""
    import hostlist

    try:
        return hostlist.expand_hostlist(text.strip(), sort=False)
    except hostlist.BadHostlist as exc:
        raise UsageError(
            f"hostlist {text!r} is malformed ({exc}); write it as Slurm does, e.g. gpu[01-04]"
        ) from exc


# ---- validating what users type -----------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_PATH = re.compile(r"^[A-Za-z0-9_./+~-]+$")
_SIGNAL = re.compile(r"^(USR1|USR2|TERM|INT)@\d+$")
_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{2}(:\d{2})?)?|\d+(:\d{2}(:\d{2})?)?)$")


def check_name(flag: str, value: str) -> str:
    if not _NAME.match(value):
        raise UsageError(
            f"{flag} {value!r} is not allowed: use letters, digits and . _ + - (at most 128, no spaces, "
            "quotes, $ ; & | or newlines)"
        )
    return value


def check_time(value: str) -> str:
    """Slurm's forms: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if not _TIME.match(value):
        raise UsageError(f"--time {value!r} is not a Slurm time; use e.g. 30, 02:00:00 or 1-12:00:00")
    return value


def check_node_count(text: str) -> None:
    """--nodes N or MIN-MAX (Slurm starts the job on what it can get within the range; training
    derives dp from the world it is started with)."""
    low, _, high = text.partition("-")
    if not low.isdigit() or (high and not high.isdigit()) or int(low) < 1 or (high and int(high) < int(low)):
        raise UsageError(f"--nodes {text!r}: give a count (4) or a range MIN-MAX (2-4) of at least 1")


def check_positive(flag: str, value: int) -> int:
    if value < 1:
        raise UsageError(f"{flag} must be at least 1, not {value}")
    return value


@dataclass
class JobSpec:
    template: str = "gpu"
    nodes: int | str = 1  # a count, or MIN-MAX: the job starts on what is free in the range
    ntasks_per_node: int = 4
    gpus_per_node: int | None = None  # None: 4 on GPU templates, none on the CPU template
    cpus_per_task: int | None = None  # None: 8 on GPU templates, Slurm's default on the CPU template
    time: str = "02:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str = "hpcllm"
    out: str = "runs"
    signal: str = "USR2@180"  # seconds before the time limit; NCCL may use USR1 itself
    max_requeues: int = 3
    array: list[str] = field(default_factory=list)  # one override per array task
    train_args: list[str] = field(default_factory=list)

    def validate(self) -> JobSpec:
        """Check every field and fill the node shape the template implies where the user gave none."""
        if self.template not in TEMPLATES and not Path(self.template).is_file():
            raise UsageError(f"--template {self.template!r}: choose {', '.join(TEMPLATES)} or give a file")
        cpu_only = self.template == "cpu"
        if cpu_only and self.gpus_per_node:
            raise UsageError("--template cpu asks for no GPUs; drop --gpus-per-node or use --template gpu")
        if self.gpus_per_node is None:
            self.gpus_per_node = 0 if cpu_only else 4
        if self.cpus_per_task is None and not cpu_only:
            self.cpus_per_task = 8
        check_node_count(str(self.nodes))
        for flag, value in (
            ("--ntasks-per-node", self.ntasks_per_node),
            ("--cpus-per-task", 1 if self.cpus_per_task is None else self.cpus_per_task),
        ):
            check_positive(flag, value)
        if self.gpus_per_node < 0:
            raise UsageError(f"--gpus-per-node must be 0 or more, not {self.gpus_per_node}")
        if self.template in ("gpu", "gpu-mpirun") and self.gpus_per_node != self.ntasks_per_node:
            raise UsageError(
                f"--ntasks-per-node {self.ntasks_per_node} with --gpus-per-node {self.gpus_per_node}: hpcllm "
                "runs one rank per GPU; make them equal"
            )
        check_time(self.time)
        check_name("--job-name", self.job_name)
        for flag, value in (("--partition", self.partition), ("--account", self.account)):
            if value is not None:
                check_name(flag, value)
        if not _PATH.match(self.out):
            raise UsageError(
                f"--out {self.out!r}: use a path of letters, digits and / . _ + - (no spaces or quotes)"
            )
        if not _SIGNAL.match(self.signal):
            raise UsageError(f"--signal {self.signal!r}: use SIGNAL@SECONDS with USR1, USR2, TERM or INT")
        if self.template == "array" and not self.array:
            raise UsageError("the array template needs --array KEY=VALUE (repeat: one per array task)")
        return self


def render(spec: JobSpec) -> str:
    import jinja2

    spec.validate()
    if spec.template in TEMPLATES:
        loader: jinja2.BaseLoader = jinja2.FileSystemLoader(str(TEMPLATE_DIR))
        name = f"{spec.template}.sbatch.j2"
    else:
        path = Path(spec.template).resolve()
        loader, name = jinja2.FileSystemLoader(str(path.parent)), path.name
    env = jinja2.Environment(
        loader=loader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env.get_template(name).render(
        spec=spec,
        train_args=" ".join(shlex.quote(a) for a in spec.train_args),
        array_overrides=[shlex.quote(a) for a in spec.array],
    )


def make_output_folder(spec: JobSpec) -> bool:
    """Create --out, where `#SBATCH --output` points: Slurm does not create it, and a job whose log
    folder is missing fails without a log. True when it was created now."""
    out = Path(spec.out)
    if out.is_dir():
        return False
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        raise UsageError(
            f"--out {spec.out}: cannot create the folder for Slurm's log ({exc.strerror})"
        ) from exc
    return True


# ---- submitting and watching --------------------------------------------------------------


def submit(spec: JobSpec) -> tuple[str, Path]:
    """Write the script under --out, sbatch it; return (job id, script path)."""
    import shutil
    import subprocess

    script = render(spec)
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UsageError(
            "sbatch is not on PATH: run on a Slurm login node (or `module load slurm`), "
            "or use `hpcllm slurm render` and submit the script elsewhere"
        )
    make_output_folder(spec)
    out = Path(spec.out)
    path = out / f"{spec.job_name}.sbatch"
    path.write_text(script)
    done = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise UsageError(
            f"sbatch refused the job: {done.stderr.strip().splitlines()[-1] if done.stderr else '?'}"
        )
    job = done.stdout.strip().split(";")[0]
    _record(job, out)
    return job, path


def _jobs_dir() -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return state / "hpcllm" / "jobs"


def _record(job: str, out: Path) -> None:
    """Remember where job `job` writes, so `slurm status` finds it without --out."""
    records = _jobs_dir()
    records.mkdir(parents=True, exist_ok=True)
    (records / f"{job}.json").write_text(json.dumps({"out": str(out.resolve())}))


def submitted_out(job: str) -> Path | None:
    """The --out that job `job` was submitted with (None when it was not submitted from here)."""
    record = _jobs_dir() / f"{job}.json"
    try:
        return Path(json.loads(record.read_text())["out"])
    except (OSError, ValueError, KeyError):
        return None
