"""`hpcllm export`: the command line of exporting a run; the work is hpcllm.training.export."""

from __future__ import annotations

import argparse
from typing import Any

from hpcllm.cli.common import from_args


def add_parser(commands: Any) -> None:
    ex = commands.add_parser(
        "export",
        help="write a run's checkpoint as a Hugging Face GPT-2 folder",
        description="Join a checkpoint of any tp/pp into the whole model and write it as a folder that "
        "transformers' GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained load.",
    )
    ex.add_argument("--run", required=True, help="run directory (hpcllm train --out)")
    ex.add_argument("--step", type=int, help="the checkpoint of this step (default: the latest)")
    ex.add_argument("--format", default="hf", help="hf: a Hugging Face GPT-2 folder (the only one)")
    ex.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    ex.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hpcllm.training import export

    return export.export(from_args(export.ExportArgs, args))
