"""T-Stitch sweep: FID and wall-clock time per image against the switch fraction, small model first.

    python scripts/tstitch_sweep.py --small fmnist-small --large fmnist-large --nfe 10 20 --num 2000 \\
        --out results/tstitch.jsonl --plot results/tstitch.png --table results/tstitch.md

Fraction 0 is the large model alone, 1 the small one alone.  Every cell samples the same noise (fastsample.sweep's
per-sample seeds) with UniPC-3.  The times come from a separate pass in the same run, after an NFE's FID cells: one
batch per fraction, the fractions interleaved, the fastest of a few repeats kept.  A rerun skips finished cells and
finished timings.
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
    """Per NFE: FID, ms per image (from the timing pass), the speed-up over the large model alone (fraction 0, timed
    in the same pass) and the FID change against it."""
    nfes = sorted({r["nfe"] for r in records})
    fracs = sorted({r["fraction"] for r in records})
    fids = {(r["nfe"], r["fraction"]): r["fid"] for r in records if "fid" in r}
    ms = {(r["nfe"], r["fraction"]): r["ms_per_image"] for r in records if "fid" not in r and "ms_per_image" in r}
    lines = ["| fraction | " + " | ".join(f"FID @ {n} | ms/image @ {n} | speed-up @ {n} | FID change @ {n}"
                                         for n in nfes) + " |", "|---" * (1 + 4 * len(nfes)) + "|"]
    for f in fracs:
        vals = []
        for n in nfes:
            a, t, a0, t0 = fids.get((n, f)), ms.get((n, f)), fids.get((n, 0.0)), ms.get((n, 0.0))
            vals += [f"{a:.3f}" if a is not None else "", f"{t:.2f}" if t is not None else "",
                     f"{t0 / t:.2f}x" if t is not None and t0 is not None else "",
                     f"{100 * (a / a0 - 1):+.1f}%" if a is not None and a0 is not None else ""]
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
            fs = [f for f in fracs if (n, f) in fids and (n, f) in ms]
            ax.plot([ms[n, f] for f in fs], [fids[n, f] for f in fs], marker="o", label=f"{n} NFE")
            for f in fs:
                ax.annotate(f"{f:g}", (ms[n, f], fids[n, f]), fontsize=6)
        ax.set_xlabel("ms per image")
        ax.set_ylabel("FID")
        ax.set_title("T-Stitch: small model for the first fraction of the steps")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
    return text


def stitched(small, large, f):
    """The model for switch fraction f: the large model alone at 0, the small one alone at 1."""
    return large if f == 0 else small if f == 1 else StitchedModel([small, large], [f])


def run(fn, noise, nfe):
    with torch.no_grad():
        return sample(fn, noise, make_named_scheduler("unipc3"), nfe, progress=False)[0]


def time_fractions(small, large, nfe, fractions, batch, repeats, seed) -> dict:
    """Milliseconds per image for each fraction: one batch sampled ``repeats`` times, the fractions interleaved
    round-robin and the fastest repeat kept, so that a burst of other load on the machine does not land on one
    fraction only."""
    noise = noise_for(range(batch), (1, 32, 32), seed)
    fns = {f: (lambda m: lambda x, t: m(x, t).sample)(stitched(small, large, f)) for f in fractions}
    run(fns[fractions[0]], noise[:2], nfe)  # warm-up: first-call allocations
    best = dict.fromkeys(fractions, float("inf"))
    for _ in range(repeats):
        for f in fractions:
            start = time.perf_counter()
            run(fns[f], noise, nfe)
            best[f] = min(best[f], 1000 * (time.perf_counter() - start) / batch)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", default="fmnist-small", choices=UNCONDITIONAL)
    p.add_argument("--large", default="fmnist-large", choices=UNCONDITIONAL)
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20])
    p.add_argument("--fractions", type=float, nargs="+", default=[round(0.1 * k, 1) for k in range(11)])
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--time-batch", type=int, default=100, help="images in the timed batch")
    p.add_argument("--time-repeats", type=int, default=3, help="timed repeats per fraction (the fastest is kept)")
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

    def append(record):
        with out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    records = read_records(out)
    done = {(r["nfe"], r["fraction"], r["num"]) for r in records if "fid" in r}
    timed = {(r["nfe"], r["fraction"]) for r in records if "ms_per_image" in r and "fid" not in r}
    for nfe in args.nfe:
        for f in args.fractions:
            if (nfe, f, args.num) in done:
                continue
            model = stitched(small, large, f)
            fn = lambda x, t: model(x, t).sample  # noqa: E731
            samples = [run(fn, noise_for(range(b, min(b + args.batch_size, args.num)), (1, 32, 32), args.seed), nfe)
                       for b in range(0, args.num, args.batch_size)]
            batches = -(-args.num // args.batch_size)
            small_calls = model.calls[0] // batches if isinstance(model, StitchedModel) else (nfe if f == 1 else 0)
            append({"small": args.small, "large": args.large, "nfe": nfe, "fraction": f, "num": args.num,
                    "fid": fid(torch.cat(samples)), "small_calls": small_calls})
        todo = [f for f in args.fractions if (nfe, f) not in timed]
        if todo:
            times = time_fractions(small, large, nfe, todo, args.time_batch, args.time_repeats, args.seed)
            for f in todo:
                append({"small": args.small, "large": args.large, "nfe": nfe, "fraction": f,
                        "ms_per_image": round(times[f], 3), "batch": args.time_batch, "repeats": args.time_repeats,
                        "threads": torch.get_num_threads()})
    print(render(read_records(out), args.plot, args.table))


if __name__ == "__main__":
    main()
