"""`hpcllm plan`: predict step time and memory of every layout of a model on a cluster, and rank them.

    hpcllm plan --model gpt2-350m --cluster a100 --nodes 2
    hpcllm plan --model llama3-8b --cluster h100 --nodes 4
    hpcllm plan --model n_layer=48,n_embd=8192,n_head=64,block_size=2048,vocab=51200 \\
        --cluster h100 --nodes 64 --global-batch 1536 --layout tp=8,pp=2 --json
    hpcllm plan calibrate                  # measure this machine: the `local` profile
    hpcllm plan validate --plot v.png      # predicted vs measured tokens/s of 12+ layouts here
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from hpcllm.errors import UsageError
from hpcllm.model.gpt2 import GPT2

DEFAULT_VOCAB = GPT2.published_vocab  # for a --model given by its numbers


def add_parser(commands: Any) -> None:
    me = commands.add_parser(
        "plan",
        help="predict step time and memory of every layout and pick the best",
        description="Predict, per rank, the step time (compute, TP traffic, pipeline bubble, DP reduction, "
        "ZeRO's gather) and the memory (states by ZeRO level, activations by Korthikanti et al. 2022) of "
        "every pp x dp x tp, micro-batch, ZeRO level, recomputation and sequence-parallel setting of a "
        "model on a cluster; print those that fit, fastest first, with the breakdown. See docs/plan.md.",
    )
    me.add_argument(
        "action",
        nargs="?",
        choices=("calibrate", "validate"),
        help="calibrate: measure this machine and write the `local` profile; validate: run layouts "
        "here with `bench train` and compare them with the prediction",
    )
    me.add_argument(
        "--model",
        help="a preset (tiny, small, gpt2-124m, ...) or n_layer=..,n_embd=..,n_head=..,block_size=..,vocab=.."
        " (calibrate: the training runs' shape, the tiny preset's by default; its vocabulary is the data's)",
    )
    me.add_argument(
        "--cluster",
        help="a shipped profile (a100, h100), local (after `plan calibrate`) or a YAML file "
        "(a100; validate: local)",
    )
    me.add_argument("--out", metavar="FILE", help="calibrate: where the profile goes (the user's local.yaml)")
    me.add_argument("--seconds", type=float, default=0.5, help="calibrate: seconds per benchmark point (0.5)")
    me.add_argument("--data", help="calibrate, validate: prepared data to train on (the default corpus)")
    me.add_argument(
        "--steps", type=int, default=30, help="calibrate, validate: training steps per layout (30)"
    )
    me.add_argument(
        "--repeat", type=int, default=2, help="calibrate, validate: interleaved repetitions of the runs (2)"
    )
    me.add_argument("--nodes", type=int, default=1, help="nodes (1)")
    me.add_argument("--gpus-per-node", type=int, help="GPUs per node (the profile's)")
    me.add_argument("--global-batch", type=int, help="sequences per step (512; validate: 32)")
    me.add_argument("--layout", help="evaluate one layout only, e.g. tp=8,pp=2[,micro_batch=1,zero=1,...]")
    me.add_argument("--top", type=int, default=10, help="layouts to print (10)")
    me.add_argument(
        "--all-settings",
        action="store_true",
        help="list every micro-batch, ZeRO, recomputation and sequence-parallel setting of each "
        "tp x pp x dp, not only the fastest",
    )
    me.add_argument("--json", action="store_true", help="machine-readable rows")
    me.add_argument(
        "--plot", metavar="FILE", help="draw the step-time breakdown of the printed layouts (PNG)"
    )
    me.add_argument(
        "--emit-slurm",
        metavar="DIR",
        help="write the batch script of the best layout to DIR/hpcllm-plan.sbatch (the gpu template)",
    )
    me.set_defaults(func=run)


def parse_model(text: str, vocab_from_data: bool = False) -> Any:
    """A preset or a full spec; `vocab_from_data`: the vocabulary comes from the prepared data
    (plan calibrate), so the spec may leave `vocab` out."""
    from hpcllm.planner.step_model import ModelSpec
    from hpcllm.training.config import PRESETS

    if text in PRESETS:
        return ModelSpec.of_preset(text)
    fields = _key_values("--model", text)
    allowed = ("n_layer", "n_embd", "n_head", "block_size", "vocab")
    needed = allowed[:-1] if vocab_from_data else allowed
    unknown = sorted(set(fields) - set(allowed))
    missing = sorted(set(needed) - set(fields))
    if unknown or missing:
        what = f"unknown {unknown[0]!r}" if unknown else f"missing {missing[0]!r}"
        raise UsageError(
            f"--model {text!r}: {what}; give a preset ({', '.join(PRESETS)}) or all of {','.join(needed)}"
        )
    spec = ModelSpec(**({"vocab": DEFAULT_VOCAB} | {key: int(value) for key, value in fields.items()}))
    zero = next((key for key in allowed if getattr(spec, key) < 1), None)
    if zero:
        raise UsageError(f"--model: {zero} must be at least 1")
    if spec.n_embd % spec.n_head:
        raise UsageError(f"--model: n_embd {spec.n_embd} is not divisible by n_head {spec.n_head}")
    return spec


def _key_values(flag: str, text: str) -> dict[str, str]:
    pairs = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise UsageError(f"{flag} {text!r}: expected key=integer pairs separated by commas")
        pairs[key.strip()] = value.strip()
    return pairs


def render(predictions: list[Any]) -> str:
    with_cp = any(p.layout.cp > 1 for p in predictions)  # the column only when some layout splits sequences
    lines = [
        f"{'tp':>3} {'pp':>3} {'dp':>4} {'cp ' if with_cp else ''}{'mb':>3} {'zero':>4} {'recompute':>9} "
        f"{'sp':>3} "
        f"{'GiB/rank':>9} {'step s':>8} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6}   "
        "compute / tp / bubble / dp / zero (s)"
    ]
    for p in predictions:
        layout, b = p.layout, p.breakdown
        lines.append(
            f"{layout.tp:>3} {layout.pp:>3} {layout.dp:>4} {f'{layout.cp:>2} ' if with_cp else ''}"
            f"{layout.micro_batch:>3} {layout.zero:>4} "
            f"{layout.recompute:>9} {'yes' if layout.sequence_parallel else 'no':>3} "
            f"{p.memory_gib_per_rank:>9.1f} {p.step_s:>8.3f} {p.tokens_per_s:>11,.0f} "
            f"{p.tflops_per_gpu / 1e12:>8.1f} {p.mfu:>6.1%}   "
            f"{b['compute_s']:.3f} / {b['tp_s']:.3f} / {b['bubble_s']:.3f} / {b['dp_exposed_s']:.3f} / "
            f"{b['zero_gather_s']:.3f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.action == "calibrate":
        return calibrate(args)
    if args.action == "validate":
        return validate(args)
    if not args.model:
        raise UsageError(
            "--model is required: a preset or n_layer=..,n_embd=..,n_head=..,block_size=..,vocab=.."
        )
    return predict_layouts(args)


def calibrate(args: argparse.Namespace) -> int:
    from hpcllm.cli.bench import prepared_data
    from hpcllm.planner import calibrate as bench
    from hpcllm.planner import profiles

    out = Path(args.out) if args.out else profiles.user_dir() / f"{profiles.LOCAL}.yaml"
    if out.exists() and not out.is_file():
        raise UsageError(f"--out {out} is not a file")
    try:  # found unwritable now, not after minutes of benchmarks
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create {out.parent} ({exc.strerror}); choose another") from exc
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"--out {out}: {out.parent} is not writable; choose another")
    if args.seconds <= 0 or args.steps < 20:
        raise UsageError(
            f"plan calibrate needs --seconds > 0 and --steps >= 20, not {args.seconds}, {args.steps}"
        )
    if args.repeat < 1:
        raise UsageError(f"--repeat must be at least 1, not {args.repeat}")
    spec = parse_model(args.model or "tiny", vocab_from_data=True)
    shape = {key: getattr(spec, key) for key in ("n_layer", "n_embd", "n_head", "block_size")}
    data = prepared_data(args.data)
    values = bench.calibrate(data, _layout_runner(data), args.seconds, args.steps, args.repeat, shape=shape)
    path = bench.write(values, out)
    print(
        f"wrote {path}: {values['peak_flops'] / 1e9:,.0f} GFLOP/s matmul peak, GPT block at "
        f"{values['gemm_efficiency']:.0%} of it (half at hidden {values['gemm_half_size']:.0f}, "
        f"{values['layer_overhead_us']:.0f} µs fixed per block), {values['memory_gbps']:.1f} GB/s memory, "
        f"allreduce {values['intra_node_gbps']:.2f} GB/s + {values['intra_node_latency_us']:.1f} µs per step"
    )
    return 0


def validate(args: argparse.Namespace) -> int:
    """Run layouts here with `bench train` and set them against the prediction."""
    from hpcllm.bench import train as bench_train
    from hpcllm.cli.bench import layout_variant, prepared_data
    from hpcllm.data.tokens import open_prepared
    from hpcllm.planner import profiles
    from hpcllm.planner import validate as check
    from hpcllm.planner.step_model import ModelSpec
    from hpcllm.training.config import PRESETS

    preset = args.model or "tiny"
    if preset not in PRESETS:
        raise UsageError(f"plan validate --model takes a preset ({', '.join(PRESETS)}), not {preset!r}")
    if args.steps < 30 or args.repeat < 1:
        raise UsageError(
            "plan validate needs --steps >= 30 (tokens/s is read per 10 steps) and --repeat >= 1"
        )
    cluster = profiles.load(args.cluster or profiles.LOCAL)
    texts = [t for t in args.layout.split(";") if t.strip()] if args.layout else list(check.LAYOUTS)
    sets = ["--set", f"model.preset={preset}"]
    global_batch = args.global_batch or 32
    sets += ["--set", f"train.global_batch={global_batch}"]
    # Every layout is checked before the first minute of measuring.
    variants = [layout_variant(text, sets[1::2]) for text in texts]
    data = prepared_data(args.data)
    vocab = open_prepared(data, verify=False).vocab_size
    model = ModelSpec.of_preset(preset, vocab)
    variants.append(check.reference_run(cluster))
    bench = bench_train.run(data, args.steps, sets, args.repeat, keys=(), layouts=variants)
    *rows, reference = bench["rows"]
    measured = {r["name"]: r["tokens_per_s"] for r in rows}
    fitted = check.fitted_layouts(cluster, PRESETS[preset], global_batch)
    result = check.compare(model, cluster, global_batch, measured, fitted)
    now = check.anchored(cluster, vocab, reference["tokens_per_s"])
    anchored = check.compare(model, now, global_batch, measured, fitted)
    for row, anchored_row, bench_row in zip(result["rows"], anchored["rows"], rows, strict=True):
        row["min"], row["max"] = bench_row["min"], bench_row["max"]
        row["anchored_error"] = anchored_row["error"]
    result |= {
        "anchored": {key: anchored[key] for key in ("median_abs_error", "spearman", "best_in_top2")},
        "reference_tokens_per_s": reference["tokens_per_s"],
        "step_scale": {"calibrated": cluster.step_scale, "now": now.step_scale},
        "cluster": cluster.name,
        "steps": args.steps,
        "repeat": args.repeat,
        "global_batch": global_batch,
    }
    if args.plot:
        check.plot(result, Path(args.plot))
    print(json.dumps(result, indent=1) if args.json else check.render(result))
    return 0


def _layout_runner(data: Path) -> Any:
    """What `plan calibrate` runs its layouts with: `hpcllm bench train` (interleaved, repeated),
    tokens/s by name."""
    from hpcllm.bench import train as bench_train

    def measure(variants: list[Any], flags: list[str], steps: int, repeat: int) -> dict[str, float]:
        result = bench_train.run(data, steps, flags, repeat, keys=(), layouts=variants)
        return {row["name"]: row["tokens_per_s"] for row in result["rows"]}

    return measure


def predict_layouts(args: argparse.Namespace) -> int:
    from hpcllm.planner import profiles, search
    from hpcllm.planner.step_model import predict

    args.global_batch = args.global_batch or 512
    cluster = profiles.load(args.cluster or "a100")
    model = parse_model(args.model)
    gpus_per_node = args.gpus_per_node or cluster.gpus_per_node
    for flag, value in (
        ("--nodes", args.nodes),
        ("--gpus-per-node", gpus_per_node),
        ("--global-batch", args.global_batch),
        ("--top", args.top),
    ):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, not {value}")
    if args.layout:
        layout = search.parse_layout(args.layout, args.global_batch, args.nodes * gpus_per_node)
        predictions = [predict(model, layout, cluster, args.global_batch, gpus_per_node)]
    else:
        predictions = search.ranked(model, cluster, args.nodes, gpus_per_node, args.global_batch)
        predictions = (predictions if args.all_settings else search.distinct(predictions))[: args.top]
    if args.emit_slurm:
        script = emit_slurm(Path(args.emit_slurm), model, predictions[0], args.nodes, gpus_per_node, args)
    if args.plot:
        plot(Path(args.plot), predictions)
    if args.json:
        print(json.dumps([p.row() for p in predictions], indent=1))
        return 0
    print(
        f"{model.parameters / 1e9:.2f}B parameters on {args.nodes} x {gpus_per_node} GPUs ({cluster.name}), "
        f"global batch {args.global_batch} x {model.block_size} tokens"
    )
    print(render(predictions))
    print(run_command(model, predictions[0], args.nodes, gpus_per_node, args.global_batch))
    if args.emit_slurm:
        print(f"batch script for the first layout: {script}  (sbatch it, or edit its site block first)")
    else:
        print("as a batch job: the same `hpcllm plan` with --emit-slurm DIR writes its Slurm script")
    if args.layout and not predictions[0].fits:
        print(
            f"does not fit: {predictions[0].memory_gib_per_rank:.1f} GiB per rank of {cluster.memory_gib:g}"
        )
    return 0


def train_arguments(model: Any, prediction: Any, global_batch: int) -> list[str]:
    """`hpcllm train` flags that run `prediction`'s layout of `model` (the vocabulary comes from the data)."""
    from hpcllm.planner.search import layout_arguments

    settings = [*model.config_settings(), f"train.global_batch={global_batch}", "train.dtype=bfloat16"]
    return layout_arguments(prediction.layout) + [a for s in settings for a in ("--set", s)]


def run_command(model: Any, prediction: Any, nodes: int, gpus_per_node: int, global_batch: int) -> str:
    """The command line that trains the first layout: the workstation launcher on one node, a
    Slurm submission on several (DATA is the user's prepared data)."""
    import shlex

    train = ["--data", "DATA", *train_arguments(model, prediction, global_batch)]
    if nodes == 1:
        start = ["python", "-m", "hpcllm.launcher", "-np", str(gpus_per_node), "hpcllm", "train"]
    else:
        start = ["hpcllm", "slurm", "submit", "--nodes", str(nodes), "--ntasks-per-node", str(gpus_per_node)]
        start += ["--gpus-per-node", str(gpus_per_node), "--"]
    return "run the first:\n  " + shlex.join(start + train)


def emit_slurm(
    directory: Path, model: Any, prediction: Any, nodes: int, gpus_per_node: int, args: Any
) -> Path:
    """Render the gpu template for the layout; an existing script is never overwritten."""
    from hpcllm.cluster.slurm import JobSpec, render

    script = directory / "hpcllm-plan.sbatch"
    if script.exists():
        raise UsageError(f"--emit-slurm: {script} exists; choose another directory or remove it")
    spec = JobSpec(
        template="gpu",
        nodes=nodes,
        ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node,
        job_name="hpcllm-plan",
        train_args=train_arguments(model, prediction, args.global_batch),
    )
    text = render(spec)
    directory.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    return script


def plot(path: Path, predictions: list[Any]) -> None:
    """Stacked bars: where each layout's predicted step goes."""
    from hpcllm.observe import plots

    terms = [("compute_s", "compute"), ("tp_s", "tensor parallel"), ("pp_p2p_s", "pipeline p2p")]
    terms += [("bubble_s", "bubble"), ("dp_exposed_s", "data parallel"), ("zero_gather_s", "ZeRO gather")]
    fig, ax = plots.figure(width=8, height=1.2 + 0.35 * len(predictions))
    labels = [
        f"tp{p.layout.tp} pp{p.layout.pp} dp{p.layout.dp} mb{p.layout.micro_batch} z{p.layout.zero} "
        f"{p.layout.recompute}{' sp' if p.layout.sequence_parallel else ''}"
        for p in predictions
    ]
    left = [0.0] * len(predictions)
    for key, name in terms:
        widths = [p.breakdown[key] for p in predictions]
        ax.barh(labels, widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("predicted seconds per step")
    plots.save(fig, path, legend_size=7)
