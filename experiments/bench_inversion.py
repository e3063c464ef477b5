"""Inversion round trips: BDIA (fastsample.invert, then a regenerating run) against diffusers' approximate
inversions, DDIMInverseScheduler + DDIMScheduler and DPMSolverMultistepInverseScheduler + DPMSolverMultistepScheduler
(2M), in one run, at 10, 20 and 50 steps, on the exact testbed (64-d Gaussian, image-like spectrum) and on
fmnist-large (Fashion-MNIST test images), in float64 and float32.

    python experiments/bench_inversion.py [--out results/inversion.jsonl] [--table results/inversion.md]

Each cell records the relative round-trip error ||x0' - x0|| / ||x0||, the model calls of the round trip and the
standard deviation of the inverted latents (BDIA's inverse divides by gamma at every step, so at gamma < 1 its
latents grow with the step count), and prints BDIA's error as a ratio of the best diffusers inversion's.  Cells
already in ``--out`` are not recomputed.
"""
from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DPMSolverMultistepInverseScheduler, DPMSolverMultistepScheduler

import fastsample
from fastsample import cli
from fastsample.results import ResultsFile, write_atomic
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.solvers import BDIAScheduler
from fastsample.testbeds import GaussianMixture
from fastsample.zoo import SCHEDULER_CONFIG

STEPS = [10, 20, 50]
GAMMAS = [1.0, 0.95, 0.5]
HEUN_GAMMAS = [1.0, 0.95]  # BDIA on EDM's Heun (base="heun"): two model calls a step either way
METHODS = ([f"bdia(gamma={g})" for g in GAMMAS] + [f"bdia-heun(gamma={g})" for g in HEUN_GAMMAS]
           + ["diffusers-ddim-inverse", "diffusers-dpm++2m-inverse"])
NO_CLIP = dict(clip_sample=False)


def round_trip(method: str, model, x0: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x0 regenerated, the inverted latents, model calls)."""
    if method.startswith("bdia"):
        base, _, gamma = method.partition("(gamma=")
        sch = BDIAScheduler(**SCHEDULER_CONFIG, gamma=float(gamma[:-1]), base="heun" if base == "bdia-heun" else "ddim")
        calls = []

        def counted(x, t, **kw):
            calls.append(1)
            return model(x, t, **kw)

        inv = fastsample.invert(counted, x0, sch, n)
        sch.load_inversion(inv)
        back, nfe = fastsample.sample(model, inv.latents, sch, n, progress=False)
        return back, inv.latents, len(calls) + nfe
    if method == "diffusers-ddim-inverse":
        inverse, forward = DDIMInverseScheduler(**SCHEDULER_CONFIG, **NO_CLIP), DDIMScheduler(**SCHEDULER_CONFIG, **NO_CLIP)
    else:
        inverse, forward = (DPMSolverMultistepInverseScheduler(**SCHEDULER_CONFIG, solver_order=2),
                            DPMSolverMultistepScheduler(**SCHEDULER_CONFIG, solver_order=2))
    z, a = fastsample.sample(model, x0, inverse, n, progress=False)
    back, b = fastsample.sample(model, z, forward, n, progress=False)
    return back, z, a + b


def cases(num_images: int):
    """(name, the model's weights hash or "exact", model, x0 in float64) for each problem."""
    gauss = GaussianMixture.image_like(64, seed=0, mean_scale=0.5, schedule=DiscreteVP(make_betas()))
    yield "testbed", "exact", gauss, gauss.sample_data(num_images, torch.Generator().manual_seed(1))
    from fastsample import zoo
    from fastsample.data import load_fashion_mnist
    from fastsample.sampling import model_fn
    from fastsample.solvers.learned_schedule import model_hash

    unet = zoo.load("fmnist-large")
    weights = model_hash(unet)
    images, _ = load_fashion_mnist("test")
    yield "fmnist-large", weights, model_fn(unet.double()), images[:num_images].double()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=cli.output(suffixes=(".jsonl",)), default="results/inversion.jsonl")
    p.add_argument("--table", type=cli.output(suffixes=(".md",)), default="results/inversion.md")
    p.add_argument("--num", type=cli.integer(1), default=64, help="samples or images a cell (default 64)")
    p.add_argument("--threads", type=cli.integer(1), default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with ResultsFile(args.out, log=print) as f:
        for problem, weights, model, x64 in cases(args.num):
            for dtype in (torch.float64, torch.float32):
                net = model if problem == "testbed" else _cast(model, dtype)
                x0 = x64.to(dtype)
                for n in STEPS:
                    for method in METHODS:
                        key = f"{problem}|{weights}|{dtype}|{n}|{method}|{args.num}"  # retrained weights: new cells
                        if key in f.keys():
                            continue
                        start = time.perf_counter()
                        with torch.no_grad():
                            back, z, calls = round_trip(method, net, x0, n)
                        err = float(((back.double() - x64).norm() / x64.norm()))
                        f.append({"key": key, "problem": problem, "weights": weights,
                                  "dtype": str(dtype).replace("torch.", ""),
                                  "steps": n, "method": method, "num": args.num, "round_trip_error": err,
                                  "model_calls": calls, "latent_std": float(z.double().std()),
                                  "seconds": round(time.perf_counter() - start, 2)})
                        print(f"{problem} {dtype} n={n} {method}: error {err:.3g}, latent std {float(z.std()):.3g}")
        records = f.records
    write_atomic(args.table, render(records))
    print(render(records))


def _cast(model_function, dtype):
    """The UNet behind ``fastsample.sampling.model_fn`` in ``dtype``."""
    from fastsample.sampling import model_fn

    return model_fn(model_function.module.to(dtype))


def render(records) -> str:
    lines = ["# Inversion round trips: x0 -> latents -> x0", "",
             "`python experiments/bench_inversion.py`: relative error ||x0' - x0|| / ||x0|| (64 samples or test images "
             "a cell; in brackets the inverted latents' standard deviation, 1 for a standard normal).  The BDIA "
             "ratio is its error over the best diffusers inversion's in the same cell.", ""]
    for problem in dict.fromkeys(r["problem"] for r in records):
        for dtype in dict.fromkeys(r["dtype"] for r in records if r["problem"] == problem):
            rows = [r for r in records if r["problem"] == problem and r["dtype"] == dtype]
            steps = sorted({r["steps"] for r in rows})
            weights = {r.get("weights", "unrecorded") for r in rows}
            if len(weights) > 1:
                raise ValueError(f"{problem}: records of several weights {sorted(weights)}; keep one set")
            lines += [f"## {problem}, {dtype}", "", f"Weights: {weights.pop()}.", "",
                      "| method | " + " | ".join(f"{n} steps" for n in steps) + " |",
                      "|---|" + "---|" * len(steps)]
            cell = {(r["method"], r["steps"]): r for r in rows}
            for m in dict.fromkeys(r["method"] for r in rows):
                lines.append(f"| {m} | " + " | ".join(
                    f"{cell[m, n]['round_trip_error']:.2e} ({cell[m, n]['latent_std']:.3g})" if (m, n) in cell else ""
                    for n in steps) + " |")
            best = {n: min(cell[m, n]["round_trip_error"] for m in METHODS if m.startswith("diffusers") and (m, n) in cell)
                    for n in steps if any(m.startswith("diffusers") and (m, n) in cell for m in METHODS)}
            g1 = "bdia(gamma=1.0)"
            if best:
                lines.append(f"| ratio {g1} / best diffusers | " + " | ".join(
                    f"{cell[g1, n]['round_trip_error'] / best[n]:.1e}" if (g1, n) in cell and n in best else ""
                    for n in steps) + " |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
