"""`hpcllm bench head` and `hpcllm bench context`: the memory of long sequences and large
vocabularies (train.loss_chunk, parallel.cp)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hpcllm.cli.common import add_set_option, int_list
from hpcllm.errors import UsageError


def add_parsers(kinds: Any) -> None:
    hd = kinds.add_parser("head", help="the head's peak memory and step time: its loss whole vs chunked")
    hd.add_argument("--vocab", type=int, default=128256, help="vocabulary (128256, Llama 3's)")
    hd.add_argument("--sequence", type=int, default=2048, help="tokens (2048)")
    hd.add_argument("--width", type=int, default=64, help="hidden width (64)")
    hd.add_argument("--chunk", type=int, default=512, help="train.loss_chunk to compare (512)")
    hd.add_argument("--steps", type=int, default=3, help="steps per process (3)")
    hd.add_argument("--repeat", type=int, default=3, help="fresh processes per variant, interleaved (3)")
    hd.add_argument("--json", action="store_true", help="machine-readable output")
    hd.set_defaults(func=head)

    cx = kinds.add_parser("context", help="activation bytes per rank and ring attention time, per cp size")
    cx.add_argument("--cp", default="1,2,4", help="context-parallel sizes, ranks each (1,2,4)")
    cx.add_argument("--repeat", type=int, default=3, help="timed attention passes (3)")
    cx.add_argument(
        "--budget-gb", type=float, default=1.0, help="per-rank budget for the longest sequence (1)"
    )
    add_set_option(cx, "model or train override (repeat); model.block_size is the sequence")
    cx.set_defaults(func=context)


def head(args: argparse.Namespace) -> int:
    from hpcllm.bench import head as bench

    if min(args.vocab, args.sequence, args.width, args.chunk, args.steps, args.repeat) < 1:
        raise UsageError("bench head needs --vocab, --sequence, --width, --chunk, --steps and --repeat >= 1")
    rows = bench.run(args.vocab, args.sequence, args.width, args.chunk, args.steps, args.repeat)
    print(
        json.dumps(bench.summary(rows), indent=1)
        if args.json
        else bench.render(rows, args.vocab, args.sequence, args.width)
    )
    return 0


def context(args: argparse.Namespace) -> int:
    from hpcllm.bench import context as bench
    from hpcllm.training import config as config_mod

    sizes = int_list(args.cp, "--cp")
    config = config_mod.load(None, args.set)
    if 1 not in sizes or config.model.block_size % (2 * max(sizes)):
        raise UsageError(
            "bench context needs cp 1 among --cp and a model.block_size divisible by 2 x each cp"
        )
    rows = bench.run(args.set, sizes, max(1, args.repeat))
    print(bench.render(rows, config.model.block_size, args.budget_gb))
    return 0
