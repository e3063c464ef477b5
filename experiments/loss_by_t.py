"""The denoising error of a Fashion-MNIST model at each noise level: epsilon MSE on the test split, by timestep bin.

    python experiments/loss_by_t.py --model fmnist-large                                   # the shipped weights
    python experiments/loss_by_t.py --model fmnist-large --checkpoint checkpoints/fmnist-large   # a checkpoint's EMA
    python experiments/loss_by_t.py --model fmnist-large --checkpoint checkpoints/fmnist-large --compare

It shows where a network errs: the grain of a long solve of fmnist-large comes from t < 50 (results/fmnist-large/
low-t.md), where the loss a model was trained with put little weight.  Every bin uses the same test images, noise and
timesteps (seeded), so two weights' rows compare the same draws; the standard error is over the images.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from fastsample import cli, zoo
from fastsample.data import load_fashion_mnist
from fastsample.schedules import make_betas

BINS = ((0, 10), (10, 20), (20, 50), (50, 100), (100, 200), (200, 400), (400, 700), (700, 1000))


def model_from(name: str, checkpoint: str | None):
    """The shipped model, or a checkpoint folder's EMA weights in the same architecture."""
    if checkpoint is None:
        return zoo.load(name)
    from fastsample.training import load_tensors

    model = zoo.build(name)
    model.load_state_dict(load_tensors(checkpoint, "ema"))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def loss_by_t(model, images: torch.Tensor, per_bin: int, seed: int, batch_size: int = 250) -> list[dict]:
    abar = torch.cumprod(1 - make_betas(), 0)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lo, hi in BINS:
        idx = torch.randint(len(images), (per_bin,), generator=g)
        t = torch.randint(lo, hi, (per_bin,), generator=g)
        noise = torch.randn(per_bin, *images.shape[1:], generator=g)
        errs = []
        for b in range(0, per_bin, batch_size):
            s = slice(b, b + batch_size)
            a = abar[t[s]].view(-1, 1, 1, 1)
            x = a.sqrt() * images[idx[s]] + (1 - a).sqrt() * noise[s]
            errs.append((model(x, t[s]).sample - noise[s]).square().mean((1, 2, 3)))
        e = torch.cat(errs).double()
        rows.append({"t": f"{lo}-{hi - 1}", "eps_mse": float(e.mean()), "se": float(e.std() / math.sqrt(len(e)))})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-large", choices=tuple(n for n, c in zoo.MODEL_CONFIGS.items() if not c[1]))
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder: its EMA weights instead of the shipped")
    p.add_argument("--compare", action="store_true", help="with --checkpoint: the shipped weights beside it")
    p.add_argument("--per-bin", type=cli.integer(10), default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=cli.integer(1), default=None)
    p.add_argument("--out", type=cli.output("file"), default=None, help="append the rows as JSONL")
    args = p.parse_args(argv)
    if args.compare and args.checkpoint is None:
        p.error("--compare needs --checkpoint")
    if args.threads:
        torch.set_num_threads(args.threads)
    images, _ = load_fashion_mnist("test")
    runs = [("shipped", None)] * args.compare + [(args.checkpoint or "shipped", args.checkpoint)]
    results = {label: loss_by_t(model_from(args.model, ckpt), images, args.per_bin, args.seed) for label, ckpt in runs}
    labels = list(results)
    print("| t | " + " | ".join(f"eps MSE, {lab}" for lab in labels) + " |")
    print("|---|" + "---|" * len(labels))
    for k, (lo, hi) in enumerate(BINS):
        cells = [f"{results[lab][k]['eps_mse']:.5f} ± {results[lab][k]['se']:.5f}" for lab in labels]
        print(f"| {lo}-{hi - 1} | " + " | ".join(cells) + " |")
    if args.out:
        with Path(args.out).open("a") as f:
            for lab in labels:
                f.write(json.dumps({"model": args.model, "weights": lab, "per_bin": args.per_bin, "seed": args.seed,
                                    "rows": results[lab]}) + "\n")


if __name__ == "__main__":
    main()
