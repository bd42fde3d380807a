"""What every command shares: an argparse that reports bad arguments in one line (exit 2), and
filling a command's argument dataclass from the parsed namespace."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

from hpcllm.errors import UsageError

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, pointing at --help."""

    def error(self, message: str) -> Any:  # argparse's error never returns
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass `cls` filled from the parsed arguments of the same names."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{name: getattr(args, name) for name in names})


def add_set_option(parser: argparse.ArgumentParser, what: str = "override a config key (repeat)") -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=what)


def int_list(text: str, flag: str) -> list[int]:
    """Positive integers from comma-separated text given to `flag`; bad text is one UsageError."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"{flag} takes comma-separated integers, not {text!r}") from exc
    if not values or min(values) < 1:
        raise UsageError(f"{flag} needs positive integers, not {text!r}")
    return values
