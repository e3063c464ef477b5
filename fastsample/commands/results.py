"""Every committed results table: the resumable sweeps of a plan (default plans/fmnist-large.json, what `make
results` runs; hours on a CPU).  A rerun skips the finished cells; --only names the blocks to run.

    fastsample results --threads 1
    fastsample results --only main-rmse dc-rmse
"""
from __future__ import annotations

from fastsample import commands
from fastsample.commands import sweep

SHARED = ("threads",)  # a plan's blocks carry their own seeds


def arguments(p):
    p.add_argument("--plan", default="plans/fmnist-large.json", help="a plan file (JSON blocks, see fastsample.sweep.load_plan)")
    p.add_argument("--only", nargs="+", default=None, help="run only these blocks")


def run(args, p):
    return sweep.plan(args.plan, args.only, p)


def main(argv=None):
    return commands.standalone(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
