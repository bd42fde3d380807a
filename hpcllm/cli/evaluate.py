"""`hpcllm eval`: the command line of evaluation; the work is hpcllm.training.evaluate."""

from __future__ import annotations

import argparse
from typing import Any

from hpcllm.cli.common import from_args


def add_parser(commands: Any) -> None:
    ev = commands.add_parser(
        "eval",
        help="score a run or a Hugging Face model: loss and perplexity, multiple-choice accuracy",
        description="Evaluate a run's checkpoint (saved at any layout) or a Hugging Face folder on "
        "prepared data (--data: loss per trained token and perplexity) and on multiple-choice tasks in "
        'the HellaSwag layout (--choices: JSONL {"context", "endings": [...], "label"}, scored by each '
        "ending's log-likelihood). Under mpirun the batches are spread over the world / tp replicas; the "
        "numbers do not depend on the rank count.",
    )
    ev.add_argument("--run", help="run directory (hpcllm train --out)")
    ev.add_argument("--step", type=int, help="with --run: the checkpoint of this step (default: latest)")
    ev.add_argument("--hf", help="a Hugging Face model folder (GPT-2 or Llama family) instead of a run")
    ev.add_argument("--data", help="prepared data (hpcllm prepare; --format sft data counts trained tokens)")
    ev.add_argument("--split", default="val", help="the split of --data (val)")
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N sequences of --data")
    ev.add_argument("--choices", metavar="FILE", help="multiple-choice examples, one JSON object per line")
    ev.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (8)")
    ev.add_argument(
        "--tp", type=int, default=1, help="split the model over this many ranks (tensor parallel)"
    )
    ev.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ev.add_argument(
        "--out", help="write the result as JSON here (default for a run: RUN/eval-CHECKPOINT.json)"
    )
    ev.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hpcllm.training import evaluate

    return evaluate.evaluate(from_args(evaluate.EvalArgs, args))
