"""Gaussian statistics of Fashion-MNIST for analytic teleportation, and the teleport point for a zoo model.

    python scripts/teleport_stats.py                                   # -> fastsample/models/fmnist-gaussian.safetensors
    python scripts/teleport_stats.py --model fmnist-large --nfe 5 6 8 10 --tol 0.005  # + the largest safe fraction

The statistics (train split, in the models' [-1, 1] space, top --rank eigenpairs) stream over the data in batches.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastsample import cli, commands
from fastsample import zoo
from fastsample.data import dataset_root, load_fashion_mnist
from fastsample.solvers import UniPCScheduler
from fastsample.solvers.teleport import GaussianStats, choose_teleport_fraction

DEFAULT_OUT = zoo.TELEPORT_STATS


def arguments(p):
    p.add_argument("--rank", type=cli.integer(1), default=None, help="of a new statistics file (default 256)")
    p.add_argument("--out", type=cli.output("file", (".safetensors",)), default=str(DEFAULT_OUT))
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's package or torchvision)")
    p.add_argument("--model", default=None, choices=tuple(n for n, c in zoo.MODEL_CONFIGS.items() if not c[1]))
    p.add_argument("--nfe", type=cli.integer(1), nargs="+", default=[5, 6, 8, 10])
    p.add_argument("--tol", type=cli.number(0.0, open_min=True), default=0.005,
                   help="the largest relative difference of noise predictions to teleport through "
                        "(calibrated: experiments/teleport_tolerance.py)")
    p.add_argument("--probes", type=cli.integer(1), default=16)


def run(args, p):
    out = Path(args.out)
    if out.is_file() and (args.rank is not None or args.data is not None):  # they would be ignored silently
        p.error(f"{out} exists, and --rank / --data only shape a new statistics file: remove it or give another --out")
    if args.model is None:
        given = [f"--{k}" for k in ("nfe", "tol", "probes") if getattr(args, k) != p.get_default(k)]
        if given:
            p.error(f"{', '.join(given)} choose the teleport fraction for --model, which was not given")
    if not out.is_file():
        try:
            dataset_root(args.data)
        except FileNotFoundError as e:
            p.error(str(e))
        images, _ = load_fashion_mnist("train", args.data)
        stats = GaussianStats.from_dataset((images[i:i + 5000] for i in range(0, len(images), 5000)),
                                           rank=256 if args.rank is None else args.rank)
        out.parent.mkdir(parents=True, exist_ok=True)
        stats.save(out)
        print(f"statistics of {stats.count} images, rank {stats.rank} -> {out}")
    stats = GaussianStats.load(out)
    if args.model:
        unet = zoo.load(args.model)
        probes = torch.randn(args.probes, 1, 32, 32, generator=torch.Generator().manual_seed(args.seed))
        for nfe in args.nfe:
            frac, errors = choose_teleport_fraction(lambda x, t: unet(x.float(), t).sample, UniPCScheduler(**zoo.SCHEDULER_CONFIG),
                                                    stats, nfe, probes, args.tol)
            print(f"NFE {nfe}: teleport_fraction {frac:.2f} (errors per node: {', '.join(f'{e:.3f}' for e in errors)})")


def main(argv=None):
    return commands.standalone(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
