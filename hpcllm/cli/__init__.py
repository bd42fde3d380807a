"""The `hpcllm` command: one module per subcommand (its parser and how it runs); this package only
assembles the parser and maps errors to exit codes.

Bad input anywhere ends in one line on stderr and exit code 2 (argparse's usage dump is cut down to
that line); a missing library or build feature in one line with the fix and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hpcllm import __version__
from hpcllm.cli import bench, evaluate, export, generate, info, plan, prepare, runs, slurm, train
from hpcllm.cli.common import Parser
from hpcllm.cluster.launcher import detect
from hpcllm.cluster.preemption import Preempted
from hpcllm.errors import EnvironmentProblem, TrainingFailure, UsageError

COMMANDS = (info, prepare, train, generate, evaluate, export, runs, bench, slurm, plan)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hpcllm", description="Train GPT language models on HPC clusters.")
    parser.add_argument("--version", action="version", version=f"hpcllm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    for command in COMMANDS:
        command.add_parser(commands)
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
    except TrainingFailure as exc:
        if speaks:
            print(f"hpcllm {command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except EnvironmentProblem as exc:
        if speaks:
            print(f"hpcllm {command}: {exc}".replace("hpcllm : ", "hpcllm: "), file=sys.stderr)
        return exc.exit_code
    except Preempted as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
