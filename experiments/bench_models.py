"""Cost of one network call of each zoo architecture: milliseconds per image at a given batch size and thread count,
and each model's cost as a fraction of ``fmnist-large``'s (T-Stitch gains only where the small model is cheap).

    python experiments/bench_models.py [--threads 2] [--batch-size 250] [--repeats 7] [--shipped]

The architectures come from ``fastsample.zoo`` (``--shipped``: the shipped folders' configs), with random weights:
the time does not depend on them.  The models run in turn, ``--repeats`` rounds after one warm-up round, and the
median of each is reported, so a load that comes and goes touches them all alike.  Writes a JSON line per model to
``--out`` when given.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import UNet2DModel

from fastsample import cli
from fastsample import zoo


def build(name: str, shipped: bool):
    if shipped:
        return UNet2DModel.from_config(UNet2DModel.load_config(zoo.MODELS_DIR / name))
    return zoo.build(name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=cli.integer(1), default=2)
    p.add_argument("--batch-size", type=cli.integer(1), default=250)
    p.add_argument("--repeats", type=cli.integer(1), default=7)
    p.add_argument("--shipped", action="store_true", help="the shipped folders' architectures, not fastsample.zoo's")
    p.add_argument("--out", type=cli.output("file", (".jsonl",)), default=None, help="JSONL file for the figures")
    args = p.parse_args(argv)
    for name in ("threads", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    models = {}
    for name, (_, classes) in zoo.MODEL_CONFIGS.items():
        m = build(name, args.shipped).eval().requires_grad_(False)
        torch.nn.Module.to(m, memory_format=torch.channels_last)  # as zoo.load does
        models[name] = (m, classes)
    b = args.batch_size
    x = torch.randn(b, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    t = torch.full((b,), 500)
    times = {name: [] for name in models}
    with torch.no_grad():
        for r in range(args.repeats + 1):
            for name, (m, classes) in models.items():
                kw = {"class_labels": torch.zeros(b, dtype=torch.long)} if classes else {}
                start = time.perf_counter()
                m(x, t, **kw)
                if r:
                    times[name].append((time.perf_counter() - start) / b * 1e3)
    large = statistics.median(times["fmnist-large"])
    print(f"threads {args.threads}, batch {b}, median of {args.repeats} ({'shipped' if args.shipped else 'zoo'} configs)")
    rows = []
    for name, (m, _) in models.items():
        ms = statistics.median(times[name])
        row = {"model": name, "ms_per_image_call": round(ms, 4), "large_over_this": round(large / ms, 3),
               "params": sum(q.numel() for q in m.parameters()), "threads": args.threads, "batch_size": b,
               "shipped_config": args.shipped}
        rows.append(row)
        print(f"{name:14s} {ms:7.3f} ms per image per call   large / this = {large / ms:5.2f}x   "
              f"{row['params']:>9,} parameters")
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
