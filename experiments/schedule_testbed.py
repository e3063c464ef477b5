"""Learned schedules against hand-made spacings on an exact testbed: held-out error against the teacher.

    python experiments/schedule_testbed.py            # 8-d mixture of 3 overlapping Gaussians, 32 fitting / 200 held-out

Columns: dp (GITS-style), gradient (LD3-style, 200 Adam iterations), gradient with per-step prediction scales.
"""
from __future__ import annotations

import time

import torch

from fastsample import sample
from fastsample.sampling import reference_states
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.solvers import DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsample.solvers.learned_schedule import learn_schedule
from fastsample.testbeds import GaussianMixture

SPACINGS = ("linspace", "karras", "logsnr", "time_uniform")


def main():
    gm = GaussianMixture.random(dim=8, components=3, seed=1, spread=1.0, schedule=DiscreteVP(make_betas()))
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.randn(200, 8, generator=g, dtype=torch.float64)

    def error(sch, **kw):
        sch.set_timesteps(**kw)
        ref = reference_states(gm, test, sch, 20)[-1]
        return float((sample(gm, test, sch, progress=False, **kw)[0] - ref).norm() / ref.norm())

    methods = (("dp", {}), ("gradient", {}), ("gradient", {"scales": True}))
    names = ("dp", "gradient", "gradient + scales")
    print("| solver | NFE | " + " | ".join(names) + " | " + " | ".join(SPACINGS)
          + " | best hand-made / best learned | fit s (" + ", ".join(names) + ") |")
    print("|---" * (4 + len(names) + len(SPACINGS)) + "|")
    for cls in (UniPCScheduler, DPMSolverPlusPlusScheduler):
        for n in (4, 5, 6, 8, 10):
            errs, took = [], []
            for method, options in methods:
                start = time.time()
                s = learn_schedule(gm, cls(solver_order=3), train, n, method=method,
                                   gradient_options=options if method == "gradient" else None)
                took.append(time.time() - start)
                errs.append(error(s.scheduler(cls(solver_order=3)), num_inference_steps=n))
            hand = [error(cls(solver_order=3, spacing=sp), num_inference_steps=n) for sp in SPACINGS]
            print(f"| {cls.__name__.replace('Scheduler', '')}-3 | {n} | " + " | ".join(f"{e:.4f}" for e in errs)
                  + " | " + " | ".join(f"{h:.4f}" for h in hand) + f" | {min(hand) / min(errs):.2f}x | "
                  + ", ".join(f"{t:.1f}" for t in took) + " |", flush=True)


if __name__ == "__main__":
    main()
