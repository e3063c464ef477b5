"""DC-Solver on exact testbeds: held-out error against the teacher, UniPC-3 (bh1) with and without fitted ratios,
and CPR fitted on the other NFEs predicting each NFE.

    python scripts/dc_testbed.py                      # 64-d Gaussian with an image-like spectrum
    python scripts/dc_testbed.py --testbed digits     # 10-component mixture fitted to scikit-learn's digits
"""
from __future__ import annotations

import argparse
import time

import torch

from fastsample import sample
from fastsample.sampling import reference_states
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.solvers import CPR, DCSolverScheduler, fit_dc_ratios
from fastsample.testbeds import GaussianMixture
from fastsample.zoo import SCHEDULER_CONFIG

F64 = torch.float64


def testbed(name: str) -> GaussianMixture:
    vp = DiscreteVP(make_betas())
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return GaussianMixture.fit(torch.tensor(d.images, dtype=F64) / 8 - 1, torch.tensor(d.target), schedule=vp)
    return GaussianMixture.image_like(64, seed=0, mean_scale=0.5, schedule=vp)


def error(model, ratios, nfe, noise, base):
    sch = DCSolverScheduler(**SCHEDULER_CONFIG, base_solver=base, dc_ratios=ratios)
    sch.set_timesteps(nfe)
    ref = reference_states(model, noise, sch)[-1]
    return float((sample(model, noise, sch, nfe, progress=False)[0] - ref).norm() / ref.norm())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default="gaussian", choices=("gaussian", "digits"))
    p.add_argument("--base-solver", default="unipc", choices=("unipc", "dpmsolver++"))
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10])
    args = p.parse_args(argv)
    model = testbed(args.testbed)
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(10, 64, generator=g, dtype=F64), torch.randn(200, 64, generator=g, dtype=F64)
    fitted, seconds = {}, {}
    for nfe in args.nfe:
        start = time.time()
        fitted[nfe] = fit_dc_ratios(model, DCSolverScheduler(**SCHEDULER_CONFIG, base_solver=args.base_solver), train, nfe)
        seconds[nfe] = time.time() - start
    print(f"| NFE | {args.base_solver} | + DC (fitted) | ratio | + DC (CPR, NFE left out) | CPR share of the gain | fit s |")
    print("|---|---|---|---|---|---|---|")
    for nfe in args.nfe:
        base = error(model, [1.0] * nfe, nfe, test, args.base_solver)
        dc = error(model, fitted[nfe], nfe, test, args.base_solver)
        cpr = CPR.fit([{"nfe": n, "ratios": fitted[n]} for n in args.nfe if n != nfe], args.base_solver)
        pred = error(model, cpr.predict(nfe), nfe, test, args.base_solver)
        print(f"| {nfe} | {base:.4f} | {dc:.4f} | {dc / base:.2f}x | {pred:.4f} | {(base - pred) / (base - dc):.0%} "
              f"| {seconds[nfe]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
