"""T-Stitch sweep: trajectory error, FID and wall-clock time per image against the switch fraction, small model first.

    python experiments/tstitch_sweep.py --small fmnist-small --large fmnist-large --nfe 10 20 \
        --out results/fmnist-large/tstitch.jsonl --plot results/fmnist-large/tstitch.png \
        --table results/fmnist-large/tstitch.md

Fraction 0 is the large model alone, 1 the small one alone.  The quality cells are rows of the one evaluation engine
(fastsample.sweep: UniPC-3 with a "tstitch" pair, keyed by both models' weights): trajectory error on ``--num-rmse``
held-out noises (RMSE against the large model's converged solve from the same noise) and FID on ``--num``.  The
times come from a separate pass in the same run, after an NFE's quality cells: one batch per fraction, the fractions
interleaved, the fastest of a few repeats kept.  A rerun skips finished cells and finished timings.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastsample import cli
from fastsample.sampling import model_fn
from fastsample import sample, zoo
from fastsample.guidance.tstitch import StitchedModel
from fastsample.results import ResultsFile
from fastsample.solvers.learned_schedule import model_hash
from fastsample.sweep import Task, make_named_scheduler, noise_for, run_sweep

UNCONDITIONAL = tuple(n for n, c in zoo.MODEL_CONFIGS.items() if not c[1])


def row(small: str, f: float) -> dict:
    return {"name": "unipc3", "label": f"fraction {f:g}"} if f == 0 else \
        {"name": "unipc3", "tstitch": {"small": small, "fraction": f}, "label": f"fraction {f:g}"}


def render(records, plot=None, table=None) -> str:
    """Per NFE: trajectory error and FID (with standard errors), ms per image (from the timing pass), the speed-up
    over the large model alone (fraction 0, timed in the same pass) and the changes against it."""
    timing = [r for r in records if r.get("kind") == "timing"]
    cells = [r for r in records if r.get("kind") != "timing"]
    nfes = sorted({r["nfe"] for r in timing + cells})
    fracs = sorted({r["fraction"] for r in timing} | {float(r["scheduler"].split()[-1]) for r in cells})
    val = {(r["metric"], r["nfe"], float(r["scheduler"].split()[-1])): (r[r["metric"]], r.get("se")) for r in cells}
    ms = {(r["nfe"], r["fraction"]): r["ms_per_image"] for r in timing}
    lines = ["| NFE | fraction | trajectory error | change | FID | change | ms/image | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for n in nfes:
        for f in fracs:
            cols = []
            for metric in ("rmse", "fid"):
                v, v0 = val.get((metric, n, f)), val.get((metric, n, 0.0))
                cols += [f"{v[0]:.4g} ± {v[1]:.2g}" if v else "",
                         f"{100 * (v[0] / v0[0] - 1):+.1f}%" if v and v0 else ""]
            t, t0 = ms.get((n, f)), ms.get((n, 0.0))
            cols += [f"{t:.2f}" if t else "", f"{t0 / t:.2f}x" if t and t0 else ""]
            lines.append(f"| {n} | {f:g} | " + " | ".join(cols) + " |")
    text = "\n".join(lines) + "\n"
    if table:
        Path(table).parent.mkdir(parents=True, exist_ok=True)
        Path(table).write_text(text)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, metric, name in zip(axes, ("rmse", "fid"), ("trajectory error (RMSE)", "FID")):
            for n in nfes:
                fs = [f for f in fracs if (metric, n, f) in val and (n, f) in ms]
                ax.plot([ms[n, f] for f in fs], [val[metric, n, f][0] for f in fs], marker="o", label=f"{n} NFE")
                for f in fs:
                    ax.annotate(f"{f:g}", (ms[n, f], val[metric, n, f][0]), fontsize=6)
            ax.set_xlabel("ms per image")
            ax.set_ylabel(name)
            ax.legend()
        fig.suptitle("T-Stitch: the small model for the first fraction of the steps")
        fig.tight_layout()
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
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
    fns = {f: model_fn(stitched(small, large, f)) for f in fractions}
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
    p.add_argument("--nfe", type=cli.integer(1), nargs="+", default=[10, 20])
    p.add_argument("--fractions", type=cli.number(0.0, 1.0), nargs="+", default=[round(0.1 * k, 1) for k in range(11)])
    p.add_argument("--metrics", nargs="+", default=["rmse", "fid"], choices=("rmse", "fid"))
    p.add_argument("--num", type=cli.integer(2), default=2000, help="samples a FID cell")
    p.add_argument("--num-rmse", type=cli.integer(1), default=500, help="held-out noises a trajectory-error cell")
    p.add_argument("--batch-size", type=cli.integer(1), default=250)
    p.add_argument("--time-batch", type=cli.integer(1), default=100, help="images in the timed batch")
    p.add_argument("--time-repeats", type=cli.integer(1), default=3, help="timed repeats per fraction (the fastest is kept)")
    p.add_argument("--seed", type=int, default=1, help="held-out noise (the fits use generator 0)")
    p.add_argument("--threads", type=cli.integer(1), default=None)
    p.add_argument("--out", type=cli.output("file", (".jsonl",)), default="results/fmnist-large/tstitch.jsonl")
    p.add_argument("--plot", type=cli.output("file", (".png",)), default=None)
    p.add_argument("--table", type=cli.output("file", (".md",)), default=None)
    args = p.parse_args(argv)
    if any(not 0 <= f <= 1 for f in args.fractions):
        p.error(f"--fractions must lie in [0, 1], got {args.fractions}")
    if args.threads:
        torch.set_num_threads(args.threads)
    task = Task(args.large)
    small, large = zoo.load(args.small), task.unet
    pair = {"small": args.small, "large": args.large, "weights": [model_hash(small), task.weights]}
    out = Path(args.out)
    log = lambda line: print(line, flush=True)  # noqa: E731
    records = []
    for nfe in args.nfe:
        for metric in args.metrics:
            records += run_sweep(args.large, [row(args.small, f) for f in args.fractions], [nfe],
                      args.num_rmse if metric == "rmse" else args.num, out, args.seed, args.batch_size, log=log,
                      metric=metric, task=task)
        with ResultsFile(out, log=log) as f:
            same = {"kind": "timing", **pair, "nfe": nfe, "batch": args.time_batch, "repeats": args.time_repeats,
                    "threads": torch.get_num_threads()}
            timed = {r["fraction"] for r in f.records if all(r.get(k) == v for k, v in same.items())}
            todo = [fr for fr in args.fractions if fr not in timed]
            if todo:
                times = time_fractions(small, large, nfe, todo, args.time_batch, args.time_repeats, args.seed)
                for fr in todo:
                    f.append({**same, "fraction": fr, "ms_per_image": round(times[fr], 3)})
                    log(json.dumps(f.records[-1]))
            records += [r for r in f.records if all(r.get(k) == v for k, v in same.items())
                        and r["fraction"] in args.fractions]
    print(render(records, args.plot, args.table))


if __name__ == "__main__":
    main()
