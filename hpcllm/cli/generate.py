"""`hpcllm generate`: the command line of sampling; the work is hpcllm.training.generate."""

from __future__ import annotations

import argparse
from typing import Any

from hpcllm.cli.common import from_args


def add_parser(commands: Any) -> None:
    gen = commands.add_parser(
        "generate",
        help="sample text from a trained run",
        description="Sample from a run's latest (or a named) checkpoint, with a KV cache, in batches. "
        "--prompts FILE (a prompt per line) under mpirun spreads the batches over the world / tp "
        "replicas and writes JSONL in the input order; --tp N splits the model over N ranks.",
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
    gen.add_argument(
        "--tp", type=int, default=1, help="split the model over this many ranks (tensor parallel)"
    )
    gen.add_argument("--batch-size", type=int, default=8, help="prompts generated together (8)")
    gen.add_argument(
        "--no-cache", action="store_true", help="recompute the whole context for every token (no KV cache)"
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user's message, rendered with the run's chat template (its fine-tuning "
        "data's); the assistant's reply is printed, ended at the end-of-turn token",
    )
    gen.add_argument("--system", help="with --chat: a system message before each prompt")
    gen.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hpcllm.training import generate

    return generate.generate(from_args(generate.GenerateArgs, args))
