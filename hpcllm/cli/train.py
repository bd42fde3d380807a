"""`hpcllm train`: the command line of training; the run itself is hpcllm.training.loop."""

from __future__ import annotations

import argparse
from typing import Any

from hpcllm.cli.common import add_set_option, from_args


def add_parser(commands: Any) -> None:
    tr = commands.add_parser(
        "train",
        help="train a GPT (dp = world / (tp*pp))",
        description="Train a GPT. With no arguments: the tiny preset on the default corpus (Python's "
        "standard library, prepared on first use). Run under mpirun/srun for data parallelism.",
    )
    tr.add_argument("--config", help="YAML file with model:, train:, parallel:, data: sections")
    add_set_option(tr)
    tr.add_argument(
        "--data",
        help="prepared data directory (hpcllm prepare --out DIR), or a weighted mixture of several "
        "sharing a tokenizer: DIR:0.7,DIR:0.3",
    )
    tr.add_argument("--out", help="run directory (default runs/<time> or runs/job-<SLURM_JOB_ID>)")
    tr.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    tr.add_argument("--tp", type=int, help="tensor-parallel size (parallel.tp)")
    tr.add_argument("--pp", type=int, help="pipeline-parallel size (parallel.pp)")
    tr.add_argument(
        "--cp", type=int, help="context-parallel size: the sequence split over ranks (parallel.cp)"
    )
    tr.add_argument(
        "--layout",
        choices=("auto",),
        help="auto: tp, pp, micro-batch, ZeRO, recomputation and sequence parallelism as `hpcllm plan` "
        "predicts fastest for the ranks found, from the calibrated local profile (`hpcllm plan calibrate`)",
    )
    tr.add_argument(
        "--init-from",
        metavar="hf:DIR|run:DIR[@STEP]",
        help="start from a Hugging Face GPT-2 or Llama folder, or an hpcllm run's checkpoint (its "
        "latest, or step STEP) with a fresh optimizer (train.init_from): its shape and weights, at any "
        "tp/pp; the data must be prepared with its tokenizer (hpcllm prepare --tokenizer DIR)",
    )
    tr.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    tr.add_argument(
        "--quiet",
        action="store_true",
        help="no progress while training (by default rank 0 prints a line every train.log_every steps "
        "to standard error, or draws a bar on a terminal)",
    )
    tr.add_argument(
        "--timeline", metavar="FILE", help="write Horovod's timeline here (horovod.timeline; dp > 1)"
    )
    tr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hpcllm.training import loop

    return loop.train(from_args(loop.TrainArgs, args))
