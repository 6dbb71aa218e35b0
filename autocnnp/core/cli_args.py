"""What the command modules share: argparse types (counts that fail with a one-line message) and the
API's options built from parsed arguments."""

from __future__ import annotations

import argparse
import dataclasses


def _at_least(text: str, minimum: int, requirement: str) -> int:
    """``text`` as an integer of at least ``minimum``; otherwise an argparse error ending "``requirement``, got N"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{requirement}, got {value}")
    return value


def positive(text: str) -> int:
    return _at_least(text, 1, "must be at least 1")


def count(text: str) -> int:
    return _at_least(text, 0, "must be >= 0")


def options_of(cls, args: argparse.Namespace):
    """``cls`` (an options dataclass of the API) from the parsed command-line ``args`` of the same names
    (repeated options as tuples)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})
