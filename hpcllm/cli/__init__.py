"""The `hpcllm` command. Each subcommand lives in its own module; this file only parses and dispatches.

Bad input anywhere ends in one line on stderr and exit code 2 (argparse's usage dump is cut down to
that line); a missing library or build feature in one line with the fix and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from hpcllm import __version__
from hpcllm.cluster.launcher import detect
from hpcllm.cluster.preemption import Preempted
from hpcllm.data.corpus import DEFAULT_EXTENSIONS
from hpcllm.errors import EnvironmentProblem, UsageError

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, pointing at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _not_yet(name: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(f"hpcllm {name}: not available yet in hpcllm {__version__} (it lands with {issue}).")
        return 0

    return run


def _info(args: argparse.Namespace) -> int:
    from hpcllm.cli import info

    return info.main(tp=args.tp, pp=args.pp)


def _prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpcllm.cluster import runtime
    from hpcllm.data import prepare

    options = prepare.PrepareOptions(
        sources=args.sources,
        out=Path(args.out),
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_ratio=args.val_ratio,
        seed=args.seed,
        text_field=args.text_field,
        extensions=tuple(e.strip() for e in args.ext.split(",") if e.strip()),
        dtype=args.dtype,
        force=args.force,
        bpe_sample_bytes=int(args.bpe_sample_mb * (1 << 20)),
    )
    prepare.check_options(options)
    rt = runtime.init(seed=args.seed)
    prepare.set_tokenizer_threads(rt.threads)
    summary = prepare.prepare(options, rt.comm)
    if rt.rank == 0:
        print(
            "\n".join(
                [
                    *summary.lines(),
                    f"wrote {options.out}/ (train.bin, val.bin, tokenizer.json, manifest.json)",
                ]
            )
        )
    return 0


def _from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass `cls` filled from the parsed arguments of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def _train(args: argparse.Namespace) -> int:
    from hpcllm.training import loop as train

    return train.train(_from_args(train.TrainArgs, args))


def _generate(args: argparse.Namespace) -> int:
    from hpcllm.cli import generate

    return generate.generate(_from_args(generate.GenerateArgs, args))


def _slurm(args: argparse.Namespace) -> int:
    from hpcllm.cluster import slurm

    if args.action == "status":
        return _slurm_status(args)
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
        out=args.out,
        signal=args.signal,
        max_requeues=args.max_requeues,
        array=args.array,
        train_args=train_args,
    )
    if args.action == "render":
        print(slurm.render(spec), end="")
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


def _slurm_status(args: argparse.Namespace) -> int:
    import json
    import shutil
    import subprocess
    from pathlib import Path

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
    metrics = Path(args.out) / f"job-{job}" / "metrics.jsonl"
    if metrics.exists():
        rows = metrics.read_text().strip().splitlines()
        if rows:
            last = json.loads(rows[-1])
            print("latest metrics: " + ", ".join(f"{k} {v}" for k, v in last.items()))
    else:
        print(f"no metrics yet at {metrics}")
    return 0


def _bench_allreduce(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from hpcllm.bench import allreduce

    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    unknown = set(engines) - set(allreduce.ENGINES)
    if unknown:
        raise UsageError(f"unknown engine(s) {sorted(unknown)}; choose from {', '.join(allreduce.ENGINES)}")
    if args.min_bytes < 4 or args.max_bytes < args.min_bytes or args.factor < 2:
        raise UsageError("need 4 <= --min-bytes <= --max-bytes and --factor >= 2")
    rows = allreduce.run(args.min_bytes, args.max_bytes, args.factor, engines)
    if rows:  # rank 0
        print(json.dumps(rows, indent=1) if args.json else allreduce.render(rows))
        if args.plot:
            allreduce.plot(rows, Path(args.plot))
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"{flag} takes comma-separated integers, not {text!r}") from exc
    if not values or min(values) < 1:
        raise UsageError(f"{flag} needs positive integers, not {text!r}")
    return values


def _bench_pipeline(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from hpcllm.bench import pipeline

    steps = 3 if args.steps is None else args.steps
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, not {steps}")
    results = pipeline.run(_int_list(args.pp, "--pp"), _int_list(args.micro, "--micro"), steps)
    print(json.dumps(results, indent=1) if args.json else pipeline.render(results))
    if args.plot:
        pipeline.plot(results, Path(args.plot))
    return 0


def _parse_sweep(text: str, sets: list[str]) -> tuple[str, list[str]]:
    """`KEY=V1,V2,...`, each value checked now (a bad one would fail minutes into the benchmark)."""
    from hpcllm.training import config

    key, _, values = text.partition("=")
    choices = [v for v in values.split(",") if v]
    if not key or not choices:
        raise UsageError(f"--sweep expects KEY=VALUE1,VALUE2,..., got {text!r}")
    for value in choices:
        config.load(assignments=[*sets, f"{key}={value}"])
    return key, choices


def _bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    if args.what == "allreduce":
        return _bench_allreduce(args)
    if args.what == "pipeline":
        return _bench_pipeline(args)
    from hpcllm.bench import train as bench_train
    from hpcllm.training.plan import check_timeline, default_data_dir

    steps = 60 if args.steps is None else args.steps
    if steps < 30 or args.repeat < 1:
        raise UsageError(
            "bench train needs --steps >= 30 (throughput is read per 10 steps after warm-up), --repeat >= 1"
        )

    keys = tuple(k for k in args.variants.split(",") if k)
    unknown = [k for k in keys if k not in bench_train.VARIANTS]
    if unknown:
        raise UsageError(
            f"--variants: unknown {','.join(unknown)}; choose among {','.join(bench_train.VARIANTS)}"
        )
    sweeps = [_parse_sweep(text, args.set) for text in args.sweep]
    data = Path(args.data) if args.data else default_data_dir()
    if not (data / "manifest.json").exists():
        if args.data:
            raise UsageError(f"--data {data} holds no prepared data; run `hpcllm prepare --out {data}`")
        print(f"preparing the default corpus into {data} (once)", file=sys.stderr)
        from hpcllm.cluster import runtime
        from hpcllm.data import prepare

        rt = runtime.init()
        prepare.prepare(prepare.PrepareOptions(sources=[], out=data, force=True), rt.comm)
    sets = [item for value in args.set for item in ("--set", value)]
    timeline = Path(args.timeline) if args.timeline else None
    if timeline is not None:
        check_timeline(str(timeline))
    result = bench_train.run(data, steps, sets, args.repeat, keys, sweeps, timeline)
    print(json.dumps(result, indent=2) if args.json else bench_train.render(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hpcllm", description="Train GPT language models on HPC clusters.")
    parser.add_argument("--version", action="version", version=f"hpcllm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    info = commands.add_parser(
        "info",
        help="what this installation and job can do (Horovod build, MPI, torch/CUDA, Slurm, ranks)",
        description="Like `horovodrun --check-build`, plus MPI, torch, CUDA/NCCL, Slurm and the rank "
        "placement when run under mpirun or srun. Exits 1 with the fix when something is missing.",
    )
    info.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size for the grid column (default 1)"
    )
    info.add_argument(
        "--pp", type=int, default=1, help="pipeline-parallel size for the grid column (default 1)"
    )
    info.set_defaults(func=_info)

    prep = commands.add_parser(
        "prepare",
        help="tokenize a corpus into token files, in parallel over ranks",
        description="Tokenize text files, directories and JSONL files into train/val token files plus a "
        "manifest. With no SOURCES, the Python standard library's .py files. Under mpirun the files are "
        "spread over the ranks; the output is the same for any number of ranks.",
    )
    prep.add_argument("sources", nargs="*", metavar="SOURCE", help="text file, directory or .jsonl file")
    prep.add_argument("--out", required=True, help="output directory (created; must be empty unless --force)")
    prep.add_argument(
        "--tokenizer", choices=["bpe", "byte"], default="bpe", help="byte-level BPE (default) or bytes"
    )
    prep.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    prep.add_argument(
        "--val-ratio", type=float, default=0.05, help="share of documents for validation (0.05)"
    )
    prep.add_argument("--seed", type=int, default=0, help="seed of the document split (default 0)")
    prep.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    prep.add_argument("--ext", default=",".join(DEFAULT_EXTENSIONS), help="extensions read from directories")
    prep.add_argument(
        "--dtype", default="auto", help="token dtype: auto (uint16 if the vocabulary fits), uint16, uint32"
    )
    prep.add_argument("--bpe-sample-mb", type=float, default=16, help="MB of text the BPE is trained on (16)")
    prep.add_argument(
        "--force", action="store_true", help="replace a non-empty --out (only once the new data is complete)"
    )
    prep.set_defaults(func=_prepare)

    tr = commands.add_parser(
        "train",
        help="train a GPT (dp = world / (tp*pp))",
        description="Train a GPT. With no arguments: the tiny preset on the default corpus (Python's "
        "standard library, prepared on first use). Run under mpirun/srun for data parallelism.",
    )
    tr.add_argument("--config", help="YAML file with model:, train:, parallel:, data: sections")
    tr.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeat)"
    )
    tr.add_argument("--data", help="prepared data directory (hpcllm prepare --out DIR)")
    tr.add_argument("--out", help="run directory (default runs/<time> or runs/job-<SLURM_JOB_ID>)")
    tr.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    tr.add_argument("--tp", type=int, help="tensor-parallel size (parallel.tp)")
    tr.add_argument("--pp", type=int, help="pipeline-parallel size (parallel.pp)")
    tr.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    tr.add_argument(
        "--timeline", metavar="FILE", help="write Horovod's timeline here (horovod.timeline; dp > 1)"
    )
    tr.set_defaults(func=_train)

    gen = commands.add_parser(
        "generate",
        help="sample text from a trained run",
        description="Sample from a run's latest (or a named) checkpoint. --prompts FILE (a prompt per line) "
        "under mpirun spreads the prompts over the ranks and writes JSONL in the input order.",
    )
    gen.add_argument("--run", required=True, help="run directory (hpcllm train --out)")
    gen.add_argument("--prompt", help="one prompt; the completion goes to stdout")
    gen.add_argument("--prompts", metavar="FILE", help="a file with one prompt per line")
    gen.add_argument("--output", help="JSONL output for --prompts (default RUN/generations.jsonl)")
    gen.add_argument("--checkpoint", help="checkpoint name under RUN/checkpoints (default: latest)")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (0.8)")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (50)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    gen.set_defaults(func=_generate)

    bench = commands.add_parser(
        "bench",
        help="benchmarks: train (hpcllm vs plain PyTorch and DDP), allreduce, pipeline",
        description="hpcllm bench train runs, in one invocation, hpcllm at world size 1, a plain PyTorch "
        "loop, hpcllm dp=2 under mpirun and torch DDP (gloo) with 2 ranks on the same model and batch, "
        "and prints tokens/s, MFU and the ratios.",
    )
    bench.add_argument("what", choices=["train", "allreduce", "pipeline"])
    bench.add_argument(
        "--steps", type=int, help="train: steps per variant (60); pipeline: steps per config (3)"
    )
    bench.add_argument("--repeat", type=int, default=1, help="interleaved repetitions of all variants (1)")
    bench.add_argument("--data", help="prepared data (default: the default corpus)")
    bench.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeat)"
    )
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.add_argument("--variants", default="a,a1,b,c,d", help="train: which of a,a1,b,c,d to run (all)")
    bench.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="train: add a dp=2 variant per value of a config key, e.g. horovod.cycle_time_ms=1,5 (repeat)",
    )
    bench.add_argument(
        "--timeline", metavar="FILE", help="train: record Horovod's timeline of one extra dp=2 run here"
    )
    bench.add_argument("--engines", default="horovod,mpi4py,torch.distributed", help="allreduce engines")
    bench.add_argument("--min-bytes", type=int, default=8, help="allreduce: smallest message (8)")
    bench.add_argument(
        "--max-bytes", type=int, default=256 << 20, help="allreduce: largest message (256 MiB)"
    )
    bench.add_argument("--factor", type=int, default=2, help="allreduce: size step factor (2)")
    bench.add_argument("--plot", help="allreduce, pipeline: write a plot PNG here")
    bench.add_argument("--pp", default="2,4", help="pipeline: stage counts (2,4)")
    bench.add_argument("--micro", default="1,2,4,8,16", help="pipeline: micro-batch counts (1,2,4,8,16)")
    bench.set_defaults(func=_bench)

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
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--ntasks-per-node", type=int, default=4, help="ranks per node (= GPUs per node)")
    sl.add_argument("--gpus-per-node", type=int, default=4)
    sl.add_argument("--cpus-per-task", type=int, default=8)
    sl.add_argument("--time", default="02:00:00", help="wall-clock limit (Slurm format)")
    sl.add_argument("--partition")
    sl.add_argument("--account")
    sl.add_argument("--job-name", default="hpcllm")
    sl.add_argument("--out", default="runs", help="where the script, Slurm log and run directory go")
    sl.add_argument("--signal", default="USR2@180", help="preemption signal and lead time (USR2@180)")
    sl.add_argument("--max-requeues", type=int, default=3, help="requeue at most this often (3)")
    sl.add_argument(
        "--array", action="append", default=[], metavar="KEY=VALUE", help="array: one override per task"
    )
    sl.add_argument(
        "jobid", nargs="?", help="status: the job id (render/submit: hpcllm train's arguments go after --)"
    )
    sl.set_defaults(func=_slurm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Under a launcher every rank parses the same arguments; only rank 0 prints the error.
    speaks = detect().rank == 0
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        # `hpcllm slurm render ... -- TRAIN_ARGS`: what follows `--` belongs to hpcllm train.
        train_args: list[str] = []
        if command == "slurm" and "--" in argv:
            cut = argv.index("--")
            argv, train_args = argv[:cut], argv[cut + 1 :]
        args = build_parser().parse_args(argv)
        args.train_args = train_args
        return int(args.func(args) or 0)
    except UsageError as exc:
        if speaks:
            print(f"hpcllm {command}: error: {exc}".replace("hpcllm : ", "hpcllm: "), file=sys.stderr)
        return exc.exit_code
    except EnvironmentProblem as exc:
        if speaks:
            print(f"hpcllm {command}: {exc}".replace("hpcllm : ", "hpcllm: "), file=sys.stderr)
        return exc.exit_code
    except Preempted as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
