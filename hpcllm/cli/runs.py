"""`hpcllm runs compare RUN...`: loss curves of several runs in one PNG, and a table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hpcllm.cli.common import Parser
from hpcllm.errors import UsageError


def add_parser(commands: Any) -> None:
    runs = commands.add_parser("runs", help="look at finished runs: compare their losses and speed")
    actions = runs.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    actions.required = True
    compare = actions.add_parser(
        "compare",
        help="the loss curves of several runs in one PNG, and a table",
        description="Draw the train and validation loss of each run into one PNG and print a table "
        "(layout, steps, last and best loss, median tokens/s and MFU, wall time); runs with identical "
        "losses are named as such and drawn dashed.",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories (hpcllm train --out)")
    compare.add_argument("--out", default="compare.png", help="the PNG to write (compare.png)")
    compare.add_argument("--force", action="store_true", help="replace --out if it exists")
    compare.add_argument("--json", action="store_true", help="the table as JSON")
    compare.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hpcllm.observe import compare

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} must name a .png file")
    if out.exists() and not args.force:
        raise UsageError(f"--out {out} exists; choose another name or pass --force to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    runs = [compare.read(Path(path)) for path in args.runs]
    compare.plot(runs, out)
    print(json.dumps(compare.summaries(runs), indent=1) if args.json else compare.render(runs))
    if not args.json:
        print(f"wrote {out}")
    return 0
