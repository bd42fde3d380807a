"""`hpcllm slurm render|submit|status`: batch scripts from templates, sbatch, and a job's progress."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hpcllm.cluster import slurm
from hpcllm.errors import UsageError


def add_parser(commands: Any) -> None:
    sl = commands.add_parser(
        "slurm",
        help="render, submit and watch Slurm batch jobs",
        description="Render a batch script from a template (gpu, gpu-mpirun, cpu, array), submit it with "
        "sbatch, or show a job's state and latest metrics. Everything after `--` goes to hpcllm train.",
    )
    sl.add_argument("action", choices=["render", "submit", "status"])
    sl.add_argument(
        "--template", default="gpu", help="gpu (srun+PMIx), gpu-mpirun, cpu, array, or a .j2 file"
    )
    sl.add_argument(
        "--nodes",
        default="1",
        help="node count, or a range MIN-MAX: the job starts on what it can get within it and, "
        "after losing a node, continues on what is left",
    )
    sl.add_argument("--ntasks-per-node", type=int, default=4, help="ranks per node (= GPUs per node)")
    sl.add_argument("--gpus-per-node", type=int, help="default 4; none with --template cpu")
    sl.add_argument("--cpus-per-task", type=int, help="default 8; Slurm's default with --template cpu")
    sl.add_argument("--time", default="02:00:00", help="wall-clock limit (Slurm format)")
    sl.add_argument("--partition")
    sl.add_argument("--account")
    sl.add_argument("--job-name", default="hpcllm")
    sl.add_argument(
        "--out",
        help="where the script, Slurm log and run directory go (default runs; status: where submit put it)",
    )
    sl.add_argument("--signal", default="USR2@180", help="preemption signal and lead time (USR2@180)")
    sl.add_argument("--max-requeues", type=int, default=3, help="requeue at most this often (3)")
    sl.add_argument(
        "--array", action="append", default=[], metavar="KEY=VALUE", help="array: one override per task"
    )
    sl.add_argument(
        "jobid", nargs="?", help="status: the job id (render/submit: hpcllm train's arguments go after --)"
    )
    sl.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "status":
        return status(args)
    if args.jobid is not None:
        raise UsageError(f"unexpected argument {args.jobid!r}; hpcllm train's arguments go after `--`")
    train_args = list(getattr(args, "train_args", []))
    spec = slurm.JobSpec(
        template=args.template,
        nodes=args.nodes,
        ntasks_per_node=args.ntasks_per_node,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        job_name=args.job_name,
        out=args.out or "runs",
        signal=args.signal,
        max_requeues=args.max_requeues,
        array=args.array,
        train_args=train_args,
    )
    if args.action == "render":
        script = slurm.render(spec)
        if slurm.make_output_folder(spec):
            print(
                f"hpcllm slurm render: created {spec.out}/ for Slurm's log (#SBATCH --output)",
                file=sys.stderr,
            )
        print(script, end="")
        return 0
    job, path = slurm.submit(spec)
    if spec.template == "array":
        where = (
            f"Slurm logs {spec.out}/slurm-{spec.job_name}-<task job id>.out, "
            f"run directories {spec.out}/job-{job}-<index>/"
        )
    else:
        where = f"Slurm log {spec.out}/slurm-{spec.job_name}-{job}.out, run directory {spec.out}/job-{job}/"
    print(f"submitted job {job} ({path}); {where} (metrics.jsonl, logs/rank-N.log)")
    return 0


def status(args: argparse.Namespace) -> int:
    if not args.jobid or not args.jobid.isdigit():
        raise UsageError("hpcllm slurm status needs a numeric JOBID")
    job = args.jobid
    squeue = shutil.which("squeue")
    if squeue is None:
        raise UsageError("squeue is not on PATH: run on a Slurm login node")
    state = subprocess.run(
        [squeue, "-h", "-j", job, "-o", "%T %M %R"], capture_output=True, text=True, timeout=30
    )
    print(f"job {job}: {state.stdout.strip() or 'not in the queue (finished, or unknown)'}")
    out = Path(args.out) if args.out else slurm.submitted_out(job) or Path("runs")
    metrics = out / f"job-{job}" / "metrics.jsonl"
    if metrics.exists():
        rows = metrics.read_text().strip().splitlines()
        if rows:
            last = json.loads(rows[-1])
            print("latest metrics: " + ", ".join(f"{k} {v}" for k, v in last.items()))
    else:
        print(f"no metrics yet at {metrics}")
    return 0
