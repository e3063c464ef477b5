"""T-Stitch sweep: FID and wall-clock time per image against the switch fraction, small model first.

    python scripts/tstitch_sweep.py --small fmnist-small --large fmnist-large --nfe 10 20 --num 2000 \\
        --out results/tstitch.jsonl --plot results/tstitch.png --table results/tstitch.md

Fraction 0 is the large model alone, 1 the small one alone.  Every cell samples the same noise (fastsample.sweep's
per-sample seeds) with UniPC-3; times are measured in the same run.  A rerun skips finished cells.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastsample import sample, zoo
from fastsample.guidance.tstitch import StitchedModel
from fastsample.metrics import fid
from fastsample.sweep import make_named_scheduler, noise_for, read_records

UNCONDITIONAL = tuple(n for n, c in zoo.MODEL_CONFIGS.items() if not c[1])


def render(records, plot=None, table=None) -> str:
    nfes = sorted({r["nfe"] for r in records})
    fracs = sorted({r["fraction"] for r in records})
    cell = {(r["nfe"], r["fraction"]): r for r in records}
    lines = ["| fraction | " + " | ".join(f"FID @ {n} NFE | ms/image @ {n}" for n in nfes) + " |",
             "|---" * (1 + 2 * len(nfes)) + "|"]
    for f in fracs:
        vals = []
        for n in nfes:
            r = cell.get((n, f))
            vals += [f"{r['fid']:.3f}", f"{r['ms_per_image']:.2f}"] if r else ["", ""]
        lines.append(f"| {f:g} | " + " | ".join(vals) + " |")
    text = "\n".join(lines) + "\n"
    if table:
        Path(table).write_text(text)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for n in nfes:
            rs = sorted((r for r in records if r["nfe"] == n), key=lambda r: r["fraction"])
            ax.plot([r["ms_per_image"] for r in rs], [r["fid"] for r in rs], marker="o", label=f"{n} NFE")
            for r in rs:
                ax.annotate(f"{r['fraction']:g}", (r["ms_per_image"], r["fid"]), fontsize=6)
        ax.set_xlabel("ms per image")
        ax.set_ylabel("FID")
        ax.set_title("T-Stitch: small model for the first fraction of the steps")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", default="fmnist-small", choices=UNCONDITIONAL)
    p.add_argument("--large", default="fmnist-large", choices=UNCONDITIONAL)
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20])
    p.add_argument("--fractions", type=float, nargs="+", default=[round(0.1 * k, 1) for k in range(11)])
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/tstitch.jsonl")
    p.add_argument("--plot", default=None)
    p.add_argument("--table", default=None)
    args = p.parse_args(argv)
    if any(not 0 <= f <= 1 for f in args.fractions):
        p.error(f"--fractions must lie in [0, 1], got {args.fractions}")
    small, large = zoo.load(args.small), zoo.load(args.large)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["nfe"], r["fraction"], r["num"]) for r in read_records(out)}
    for nfe in args.nfe:
        for f in args.fractions:
            if (nfe, f, args.num) in done:
                continue
            model = large if f == 0 else small if f == 1 else StitchedModel([small, large], [f])
            fn = lambda x, t: model(x, t).sample  # noqa: E731
            samples, start = [], time.perf_counter()
            for b in range(0, args.num, args.batch_size):
                noise = noise_for(range(b, min(b + args.batch_size, args.num)), (1, 32, 32), args.seed)
                with torch.no_grad():
                    samples.append(sample(fn, noise, make_named_scheduler("unipc3"), nfe, progress=False)[0])
            ms = 1000 * (time.perf_counter() - start) / args.num
            batches = -(-args.num // args.batch_size)
            small_calls = model.calls[0] // batches if isinstance(model, StitchedModel) else (nfe if f == 1 else 0)
            record = {"small": args.small, "large": args.large, "nfe": nfe, "fraction": f, "num": args.num,
                      "ms_per_image": round(ms, 3), "fid": fid(torch.cat(samples)), "small_calls": small_calls}
            with out.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    print(render(read_records(out), args.plot, args.table))


if __name__ == "__main__":
    main()
