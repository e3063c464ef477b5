"""Calibrate the automatic teleport fraction's tolerance on fitting noise: for each tolerance, the fraction that
``choose_teleport_fraction`` picks at each step count and the trajectory error it gives, against plain UniPC-3.

    python experiments/teleport_tolerance.py --model fmnist-large --nfe 4 5 6 8 10 12 --num 64 --threads 1

The noises are the fitting generator's (0), never the held-out seed the results tables use; the reference is UniPC-3
at 200 steps from the same noise, as in the sweep.  The table goes to stdout: per step count, the model calls and
the error of each tolerance's choice, and plain UniPC-3 at those calls.
"""
from __future__ import annotations

import argparse

import torch

from fastsample import cli, sample, zoo
from fastsample.metrics import rmse_with_se
from fastsample.sampling import model_fn
from fastsample.solvers.teleport import GaussianStats, choose_teleport_fraction
from fastsample.sweep import TELEPORT_PROBES, make_named_scheduler


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-large", choices=[n for n, c in zoo.MODEL_CONFIGS.items() if not c[1]])
    ap.add_argument("--nfe", type=cli.integer(2), nargs="+", default=[4, 5, 6, 8, 10, 12], help="step counts")
    ap.add_argument("--tols", type=cli.number(0.0, open_min=True), nargs="+", default=[0.002, 0.005, 0.01, 0.02, 0.05])
    ap.add_argument("--num", type=cli.integer(1), default=64, help="fitting noises scored")
    ap.add_argument("--threads", type=cli.integer(1), default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = model_fn(zoo.load(args.model))
    stats = GaussianStats.load(zoo.TELEPORT_STATS)
    g = torch.Generator().manual_seed(0)
    probes = torch.randn(TELEPORT_PROBES, *stats.shape, generator=g)  # what the sweep's ":teleport-auto" chooses on
    noise = torch.randn(args.num, *stats.shape, generator=g)         # scored: the next draws of the same generator
    with torch.no_grad():
        reference, _ = sample(model, noise, make_named_scheduler("unipc3", args.model, 200), 200, progress=False)

    def error(scheduler, n):
        x_T = scheduler.prepare_latents(noise, n) if hasattr(scheduler, "prepare_latents") else noise
        with torch.no_grad():
            x, calls = sample(model, x_T, scheduler, n, progress=False)
        return calls, rmse_with_se(x, reference)[0]

    plain = {}
    print("| steps | " + " | ".join(f"tol {t:g}: calls, error" for t in args.tols) + " |")
    print("|---" * (len(args.tols) + 1) + "|")
    for n in args.nfe:
        cells = []
        for tol in args.tols:
            base = make_named_scheduler("unipc3", args.model, n)
            with torch.no_grad():
                fraction, _ = choose_teleport_fraction(model, base, stats, n, probes, tol=tol)
            sch = make_named_scheduler("unipc3", args.model, n) if fraction == 0 else \
                type(base).from_config(base.config, teleport_stats=str(zoo.TELEPORT_STATS), teleport_fraction=fraction)
            calls, err = error(sch, n)
            if calls not in plain:
                plain[calls] = error(make_named_scheduler("unipc3", args.model, calls), calls)[1]
            cells.append(f"{calls}, {err:.4f} ({err / plain[calls]:.2f}x)")
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
