"""`hpcllm bench train|allreduce|pipeline`: one subcommand per benchmark, each with its own flags.

The measurement code is hpcllm.bench; this module checks the flags (bad ones exit 2 before minutes
of benchmarking) and prints tables, JSON and plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hpcllm.cli import bench_sequence
from hpcllm.cli.common import Parser, add_set_option, int_list
from hpcllm.errors import UsageError


def add_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmarks: train (hpcllm vs plain PyTorch and DDP), allreduce, pipeline, memory, generate, "
        "prepare, startup, checkpoint, packing, head, context",
        description="Benchmarks whose results docs/benchmarks.md records, as ratios measured side by side.",
    )
    kinds = bench.add_subparsers(dest="what", metavar="BENCHMARK", parser_class=Parser)
    kinds.required = True
    for add in (
        _add_train,
        _add_allreduce_and_pipeline,
        _add_prepare,
        _add_memory_and_generate,
        _add_startup,
        bench_sequence.add_parsers,
    ):
        add(kinds)


def _add_train(kinds: Any) -> None:
    tr = kinds.add_parser(
        "train",
        help="hpcllm vs a plain PyTorch loop and DDP, tokens/s and MFU",
        description="Runs, in one invocation, hpcllm at world size 1, a plain PyTorch loop, hpcllm dp=2 "
        "under mpirun and torch DDP (gloo) with 2 ranks on the same model and batch, and prints "
        "tokens/s, MFU and the ratios.",
    )
    tr.add_argument("--steps", type=int, help="steps per variant (60)")
    tr.add_argument("--repeat", type=int, default=1, help="interleaved repetitions of all variants (1)")
    tr.add_argument("--data", help="prepared data (default: the default corpus)")
    add_set_option(tr, "config override (repeat)")
    tr.add_argument("--variants", help="which of a,a1,b,c,d to run (all; none when --layout is given)")
    tr.add_argument(
        "--layout",
        action="append",
        default=[],
        metavar="tp=..,pp=..,dp=..[,micro_batch=..]",
        help="add hpcllm in this layout, tp*pp*dp ranks under mpirun (repeat; also zero, recompute, "
        "sequence_parallel)",
    )
    tr.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="add a dp=2 variant per value of a config key, e.g. horovod.cycle_time_ms=1,5 (repeat)",
    )
    tr.add_argument("--timeline", metavar="FILE", help="record Horovod's timeline of one extra dp=2 run here")
    tr.add_argument("--json", action="store_true", help="machine-readable output")
    tr.set_defaults(func=train)


def _add_allreduce_and_pipeline(kinds: Any) -> None:
    ar = kinds.add_parser("allreduce", help="allreduce bandwidth of Horovod, mpi4py and torch.distributed")
    ar.add_argument(
        "--engines", default="horovod,horovod-gloo,mpi4py,torch.distributed", help="allreduce engines"
    )
    ar.add_argument("--min-bytes", type=int, default=8, help="smallest message (8)")
    ar.add_argument("--max-bytes", type=int, default=256 << 20, help="largest message (256 MiB)")
    ar.add_argument("--factor", type=int, default=2, help="size step factor (2)")
    ar.add_argument("--plot", help="write a plot PNG here")
    ar.add_argument("--json", action="store_true", help="machine-readable output")
    ar.set_defaults(func=allreduce)

    pl = kinds.add_parser("pipeline", help="pipeline bubble and activation memory, GPipe vs 1F1B")
    pl.add_argument("--steps", type=int, help="steps per configuration (3)")
    pl.add_argument("--pp", default="2,4", help="stage counts (2,4)")
    pl.add_argument("--micro", default="1,2,4,8,16", help="micro-batch counts (1,2,4,8,16)")
    pl.add_argument("--plot", help="write a plot PNG here")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=pipeline)


def _add_prepare(kinds: Any) -> None:
    pr = kinds.add_parser(
        "prepare",
        help="prepare's scaling: ranks, input size, peak memory, and the tokenizer's own speed",
        description="Prepares a synthetic JSONL file of --small-mb and one of --large-mb on one rank, the "
        "large one on --ranks ranks, and the default corpus on 1 and --ranks ranks, one core per rank; "
        "prints the ratios and the tokenizer's own batch-encoding speed on one core.",
    )
    pr.add_argument("--small-mb", type=float, default=100, help="the small synthetic file (100 MB)")
    pr.add_argument("--large-mb", type=float, default=1000, help="the large synthetic file (1000 MB)")
    pr.add_argument("--ranks", type=int, default=2, help="ranks compared with one (2)")
    pr.add_argument("--repeat", type=int, default=7, help="alternated pairs of default-corpus runs (7)")
    pr.add_argument("--workdir", help="where the synthetic files go (the system temp directory)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=prepare)


def _add_memory_and_generate(kinds: Any) -> None:
    me = kinds.add_parser("memory", help="bytes per rank by kind, per recomputation and ZeRO mode")
    me.add_argument("--dp", type=int, default=4, help="data-parallel size the optimizer is sharded over (4)")
    me.add_argument("--vocab", type=int, default=4096, help="vocabulary size (4096: the default corpus)")
    me.add_argument("--steps", type=int, default=5, help="timed steps per mode (5)")
    me.add_argument("--budget-gb", type=float, help="also: the most layers that fit in this many GB per rank")
    me.add_argument(
        "--measure",
        action="store_true",
        help="also: train --steps at dp ranks for each zero level, a checkpoint at the end, and report "
        "each rank's peak resident memory as the process saw it (RUN/memory.json)",
    )
    me.add_argument("--data", help="with --measure: prepared data (default: the default corpus)")
    add_set_option(me, "config override (repeat), e.g. model.preset=small")
    me.add_argument("--json", action="store_true", help="machine-readable output")
    me.set_defaults(func=memory)

    ge = kinds.add_parser(
        "generate", help="greedy generation tokens/s: KV cache vs none vs transformers' generate"
    )
    ge.add_argument("--model", default="tiny", help="preset whose shape is measured (tiny)")
    ge.add_argument("--new-tokens", type=int, default=256, help="tokens generated per prompt (256)")
    ge.add_argument("--batches", default="1,8", help="batch sizes (1,8)")
    ge.add_argument("--repeat", type=int, default=3, help="interleaved runs per variant, best kept (3)")
    ge.add_argument("--data", help="prepared data whose tokenizer to use (default: the default corpus)")
    ge.add_argument("--json", action="store_true", help="machine-readable output")
    ge.set_defaults(func=generate)


def _add_startup(kinds: Any) -> None:
    st = kinds.add_parser("startup", help="time from launch to the first step, by token-file size")
    st.add_argument("--sizes", default="0.1,4", help="train-split sizes in GB, synthetic tokens (0.1,4)")
    st.add_argument("--ranks", type=int, default=2, help="ranks per training run (2)")
    st.add_argument("--repeat", type=int, default=3, help="runs per size, interleaved (3)")
    st.add_argument("--workdir", help="where the synthetic data goes (default: the system temp directory)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=startup)

    ck = kinds.add_parser(
        "checkpoint", help="step time and memory a checkpoint costs: synchronous vs in the background"
    )
    ck.add_argument("--steps", type=int, default=24, help="steps per run (24)")
    ck.add_argument("--every", type=int, default=6, help="a checkpoint every this many steps (6)")
    ck.add_argument("--repeat", type=int, default=3, help="interleaved runs per variant (3)")
    ck.add_argument("--data", help="prepared data (default: the default corpus)")
    ck.add_argument("--json", action="store_true", help="machine-readable output")
    ck.set_defaults(func=checkpoint)

    pk = kinds.add_parser(
        "packing", help="trained tokens/s of fine-tuning samples of mixed lengths: packed vs padded"
    )
    pk.add_argument("--steps", type=int, default=20, help="steps per run (20)")
    pk.add_argument("--repeat", type=int, default=3, help="interleaved runs per variant (3)")
    pk.add_argument("--block", type=int, default=256, help="model.block_size (256)")
    pk.add_argument("--records", type=int, default=4000, help="synthetic records (4000)")
    add_set_option(pk, "model or train override for both runs (repeat)")
    pk.add_argument("--json", action="store_true", help="machine-readable output")
    pk.set_defaults(func=packing)


def allreduce(args: argparse.Namespace) -> int:
    from hpcllm.bench import allreduce as bench

    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    unknown = set(engines) - set(bench.ENGINES)
    if unknown:
        raise UsageError(f"unknown engine(s) {sorted(unknown)}; choose from {', '.join(bench.ENGINES)}")
    if args.min_bytes < 4 or args.max_bytes < args.min_bytes or args.factor < 2:
        raise UsageError("need 4 <= --min-bytes <= --max-bytes and --factor >= 2")
    rows = bench.run(args.min_bytes, args.max_bytes, args.factor, engines)
    if rows:  # rank 0
        print(json.dumps(rows, indent=1) if args.json else bench.render(rows))
        if args.plot:
            bench.plot(rows, Path(args.plot))
    return 0


def generate(args: argparse.Namespace) -> int:
    from hpcllm.bench import generate as bench
    from hpcllm.training.config import PRESETS

    if args.model not in PRESETS:
        raise UsageError(f"--model takes a preset ({', '.join(PRESETS)}), not {args.model!r}")
    if args.new_tokens < 1 or args.repeat < 1:
        raise UsageError("--new-tokens and --repeat must be at least 1")
    batches = tuple(int_list(args.batches, "--batches"))
    result = bench.run(prepared_data(args.data), args.model, args.new_tokens, batches, args.repeat)
    print(json.dumps(result, indent=1) if args.json else bench.render(result))
    return 0


def pipeline(args: argparse.Namespace) -> int:
    from hpcllm.bench import pipeline as bench

    steps = 3 if args.steps is None else args.steps
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, not {steps}")
    results = bench.run(int_list(args.pp, "--pp"), int_list(args.micro, "--micro"), steps)
    print(json.dumps(results, indent=1) if args.json else bench.render(results))
    if args.plot:
        bench.plot(results, Path(args.plot))
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


def train(args: argparse.Namespace) -> int:
    from hpcllm.bench import train as bench_train
    from hpcllm.training.plan import check_timeline

    steps = 60 if args.steps is None else args.steps
    if steps < 30 or args.repeat < 1:
        raise UsageError(
            "bench train needs --steps >= 30 (throughput is read per 10 steps after warm-up), --repeat >= 1"
        )

    variants = args.variants if args.variants is not None else ("" if args.layout else "a,a1,b,c,d")
    keys = tuple(k for k in variants.split(",") if k)
    unknown = [k for k in keys if k not in bench_train.VARIANTS]
    if unknown:
        raise UsageError(
            f"--variants: unknown {','.join(unknown)}; choose among {','.join(bench_train.VARIANTS)}"
        )
    sweeps = [_parse_sweep(text, args.set) for text in args.sweep]
    layouts = [layout_variant(text, args.set) for text in args.layout]
    if not keys and not sweeps and not layouts:
        raise UsageError("nothing to run: give --variants, --sweep or --layout")
    data = prepared_data(args.data)
    sets = [item for value in args.set for item in ("--set", value)]
    timeline = Path(args.timeline) if args.timeline else None
    if timeline is not None:
        check_timeline(str(timeline))
    result = bench_train.run(data, steps, sets, args.repeat, keys, sweeps, timeline, layouts)
    print(json.dumps(result, indent=2) if args.json else bench_train.render(result))
    return 0


def layout_variant(text: str, sets: list[str]) -> tuple[str, int, list[str]]:
    """(name, ranks, `hpcllm train` flags) of `--layout` text, checked against the global batch now."""
    from hpcllm.planner.search import layout_arguments, layout_settings, layout_text, parse_layout
    from hpcllm.training import config
    from hpcllm.training.plan import make_plan

    layout = parse_layout(text, config.load(assignments=sets).train.global_batch)
    try:  # what `hpcllm train` would refuse, refused before any run starts
        make_plan(config.load(assignments=[*sets, *layout_settings(layout)]), layout.gpus)
    except UsageError as exc:
        raise UsageError(f"--layout {text}: {exc}") from exc
    return layout_text(layout), layout.gpus, layout_arguments(layout)


def prepared_data(path: str | None) -> Path:
    """The prepared data a benchmark trains on: `path`, or the default corpus (prepared once)."""
    from hpcllm.training.plan import default_data_dir

    data = Path(path) if path else default_data_dir()
    if not (data / "manifest.json").exists():
        if path:
            raise UsageError(f"--data {data} holds no prepared data; run `hpcllm prepare --out {data}`")
        print(f"preparing the default corpus into {data} (once)", file=sys.stderr)
        from hpcllm.cluster import runtime
        from hpcllm.data import prepare

        rt = runtime.init()
        prepare.prepare(prepare.PrepareOptions(sources=[], out=data, force=True), rt.comm)
    return data


def startup(args: argparse.Namespace) -> int:
    from hpcllm.bench import startup as bench

    try:
        sizes = [float(v) for v in args.sizes.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"--sizes takes comma-separated gigabytes, not {args.sizes!r}") from exc
    if not sizes or min(sizes) <= 0 or args.ranks < 1 or args.repeat < 1:
        raise UsageError("bench startup needs positive --sizes, --ranks >= 1 and --repeat >= 1")
    try:
        result = bench.run(sizes, args.ranks, args.repeat, args.workdir)
    except OSError as exc:  # a full disk or a directory that cannot be written: say so, in one line
        where = args.workdir or "the system temp directory"
        raise UsageError(
            f"bench startup: cannot write the synthetic data in {where} ({exc}); use --workdir"
        ) from exc
    print(json.dumps(result, indent=1) if args.json else bench.render(result))
    return 0


def checkpoint(args: argparse.Namespace) -> int:
    from hpcllm.bench import checkpoint as bench

    if args.every < 2 or args.steps < 3 * args.every or args.repeat < 1:
        raise UsageError("bench checkpoint needs --every >= 2, --steps >= 3 x --every and --repeat >= 1")
    result = bench.run(prepared_data(args.data), args.steps, args.every, args.repeat)
    print(json.dumps(result, indent=1) if args.json else bench.render(result))
    return 0


def prepare(args: argparse.Namespace) -> int:
    from hpcllm.bench import prepare as bench

    if not 0 < args.small_mb < args.large_mb or args.ranks < 2 or args.repeat < 1:
        raise UsageError("bench prepare needs 0 < --small-mb < --large-mb, --ranks >= 2 and --repeat >= 1")
    from hpcllm.cluster.runtime import usable_cores

    cores = usable_cores()  # a core per rank
    if args.ranks > cores:
        raise UsageError(f"bench prepare --ranks {args.ranks}: this process may use only {cores} cores")
    try:
        result = bench.run(args.small_mb, args.large_mb, args.ranks, args.workdir, args.repeat)
    except OSError as exc:
        where = args.workdir or "the system temp directory"
        raise UsageError(f"bench prepare: cannot write the corpus in {where} ({exc}); use --workdir") from exc
    print(json.dumps(result, indent=1) if args.json else bench.render(result))
    return 0


def memory(args: argparse.Namespace) -> int:
    from hpcllm.bench import memory as bench
    from hpcllm.training import config as config_mod

    if args.dp < 1 or args.vocab < 2 or args.steps < 1:
        raise UsageError("bench memory needs --dp >= 1, --vocab >= 2 and --steps >= 1")
    if args.budget_gb is not None and args.budget_gb <= 0:
        raise UsageError(f"--budget-gb must be positive, not {args.budget_gb}")
    config = config_mod.load(None, args.set)
    if config.parallel.cp > 1:  # one process here: the ring needs its ranks
        raise UsageError(
            f"bench memory measures one process; parallel.cp={config.parallel.cp} needs its ranks: "
            f"hpcllm bench context --cp 1,{config.parallel.cp} measures the bytes per rank side by side"
        )
    rows = bench.run(config, args.vocab, args.dp, args.steps)
    largest = None
    if args.budget_gb:
        largest = bench.largest_models(config, args.vocab, args.dp, args.budget_gb * 1e9)
    measured = bench.measure(args.set, args.dp, args.steps, args.data) if args.measure else None
    if args.json:
        extra = {"largest": largest, "measured": measured}
        print(json.dumps({"rows": rows, **extra} if largest or measured else rows, indent=1))
        return 0
    print(bench.render(rows))
    if largest:
        print(bench.render_largest(largest, args.budget_gb, config, args.dp))
    if measured:
        print(bench.render_measured(measured, rows))
    return 0


def packing(args: argparse.Namespace) -> int:
    from hpcllm.bench import packing as bench

    if args.steps < 3 or args.repeat < 1 or args.block < 16 or args.records < 1:
        raise UsageError("bench packing needs --steps >= 3, --repeat >= 1, --block >= 16 and --records >= 1")
    result = bench.run(args.steps, args.repeat, args.block, args.records, args.set)
    print(json.dumps(result, indent=1) if args.json else bench.render(result))
    return 0
