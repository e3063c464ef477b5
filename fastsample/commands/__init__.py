"""The ``fastsample`` command line: one subcommand per task, each a module of this package with ``arguments(p)``
(its own options) and ``run(args, p)``; the options every subcommand shares (``--threads``, ``--seed``) come from one
parent parser.  ``scripts/<name>.py`` and ``python -m fastsample.commands.<module>`` run the same code alone.

    fastsample --help
    fastsample sample --nfe 5 10 --out grid.png
    fastsample sweep --model testbed --nfe 5 10 20 --num 512
    fastsample results --only main-rmse
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fastsample import cli

COMMANDS = {  # subcommand: module of fastsample.commands
    "sample": "sample",
    "sweep": "sweep",
    "results": "results",
    "learn-schedule": "learn_schedule",
    "fit-dc": "fit_dc",
    "teleport-stats": "teleport_stats",
    "train": "train",
    "bench": "bench",
}
SHARED = ("threads", "seed")  # what a module takes from the parent parser unless it names fewer in its own SHARED


def shared_parser(names=SHARED) -> argparse.ArgumentParser:
    """The parent parser of every subcommand: the options of ``names`` (a subset of ``SHARED``)."""
    unknown = set(names) - set(SHARED)
    if unknown:
        raise ValueError(f"names must be among {SHARED}, got {sorted(unknown)}")
    p = argparse.ArgumentParser(add_help=False)
    if "threads" in names:
        p.add_argument("--threads", type=cli.integer(1), default=None,
                       help="torch's intra-op threads (default: torch's own choice)")
    if "seed" in names:
        p.add_argument("--seed", type=int, default=0, help="seed of the command's noise and data order")
    return p


def module(command: str):
    """The module behind a subcommand."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {command!r}")
    return importlib.import_module(f"{__name__}.{COMMANDS[command]}")


def _parser(mod, p: argparse.ArgumentParser | None = None, **kwargs) -> argparse.ArgumentParser:
    kwargs = {"description": mod.__doc__, "formatter_class": argparse.RawDescriptionHelpFormatter,
              "parents": [shared_parser(getattr(mod, "SHARED", SHARED))], **kwargs}
    p = p.add_parser(**kwargs) if p is not None else argparse.ArgumentParser(**kwargs)
    mod.arguments(p)
    p.set_defaults(_module=mod, _parser=p)
    return p


def _run(args):
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return args._module.run(args, args._parser)


def standalone(name: str, argv=None):
    """Run the module ``name`` (a ``__name__``) as its own command: what ``scripts/<name>.py`` calls."""
    mod = sys.modules[name] if name in sys.modules else importlib.import_module(name)
    return _run(_parser(mod).parse_args(argv))


def _summary(doc: str | None) -> str:
    """The first sentence of a module's docstring."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".") + "."


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for command in COMMANDS:
        mod = module(command)
        _parser(mod, sub, name=command, prog=f"fastsample {command}",
                help=_summary(mod.__doc__))
    return p


def main(argv=None):
    """The ``fastsample`` console script."""
    return _run(parser().parse_args(argv))
