"""Argument types for the command lines in scripts/: each checks its value when the arguments are parsed, before
any work, and argparse reports a bad one as ``argument --num: must be an integer >= 1, got 0``."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def integer(minimum: int | None = 1, maximum: int | None = None):
    """An int in [minimum, maximum] (None: unbounded on that side)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be an integer {_range(minimum, maximum)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum: float | None = None, maximum: float | None = None, open_min: bool = False,
           open_max: bool = False):
    """A finite float in the interval (``open_min`` / ``open_max``: the end itself excluded)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        low_bad = minimum is not None and (value <= minimum if open_min else value < minimum)
        high_bad = maximum is not None and (value >= maximum if open_max else value > maximum)
        if not math.isfinite(value) or low_bad or high_bad:
            lo = "" if minimum is None else f"{'(' if open_min else '['}{minimum}"
            hi = "" if maximum is None else f"{maximum}{')' if open_max else ']'}"
            where = f"in {lo or '(-inf'}, {hi or 'inf)'}"
            raise argparse.ArgumentTypeError(f"must be a finite number {where}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _range(minimum, maximum) -> str:
    if maximum is None:
        return f">= {minimum}"
    if minimum is None:
        return f"<= {maximum}"
    return f"in [{minimum}, {maximum}]"


def check_writable(path, kind: str = "file") -> Path:
    """``path`` can be written as a ``kind`` ("file" or "dir"): no part of it is a file (or, for a file, a folder),
    and its nearest existing folder is writable.  Nothing is created."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    parent = path.parent if kind == "file" else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {parent} is not writable")
    return path


def output(kind: str = "file", suffixes: tuple[str, ...] = ()):
    """An output path, checked as ``check_writable`` does; ``suffixes``: the endings allowed for a file."""
    def parse(text: str) -> Path:
        if suffixes and not text.lower().endswith(suffixes):
            raise argparse.ArgumentTypeError(f"must end in {' or '.join(suffixes)}, got {text!r}")
        try:
            return check_writable(text, kind)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = "output path"
    return parse
