"""DC-Solver on exact testbeds: held-out error against the teacher, UniPC-3 (bh1) with and without fitted ratios,
and CPR fitted on the other NFEs predicting each NFE.

    python experiments/dc_testbed.py                      # 64-d Gaussian with an image-like spectrum
    python experiments/dc_testbed.py --testbed digits     # 10-component mixture fitted to scikit-learn's digits
    python experiments/dc_testbed.py --model fmnist-large --fits dc/fmnist-large   # a zoo model's shipped fits

With ``--model``, the ratios are not refitted: they come from ``<fits>/ratios.jsonl`` (``scripts/fit_dc.py``, its
fit times too), and the held-out latents (``--num-test``) are drawn from another seed than the fits'.
"""
from __future__ import annotations

import argparse
import time

import torch

from fastsample import cli
from fastsample.sampling import model_fn
from fastsample import sample
from fastsample.sampling import reference_states
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.solvers import CPR, DCSolverScheduler, fit_dc_ratios
from fastsample.testbeds import GaussianMixture
from fastsample.zoo import MODEL_CONFIGS, SCHEDULER_CONFIG

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


def shipped_fits(folder, nfes, base_solver) -> tuple[dict, dict]:
    """Ratios and fit seconds per NFE (guidance 1) from ``<folder>/ratios.jsonl``; a clear error for what is missing."""
    import json
    from pathlib import Path

    if folder is None:
        raise SystemExit("--model needs --fits, the folder scripts/fit_dc.py wrote (e.g. dc/fmnist-large)")
    path = Path(folder) / "ratios.jsonl"
    if not path.is_file():
        raise SystemExit(f"no {path}: fit it with python scripts/fit_dc.py --out {folder}")
    config = json.loads((Path(folder) / f"nfe{nfes[0]}-cfg1" / "scheduler_config.json").read_text())
    if config["base_solver"] != base_solver:
        raise SystemExit(f"{folder} holds fits for base_solver={config['base_solver']!r}, not {base_solver!r}")
    rows = {r["nfe"]: r for r in map(json.loads, path.read_text().splitlines()) if r["guidance_scale"] == 1.0}
    missing = [n for n in nfes if n not in rows]
    if missing:
        raise SystemExit(f"{path} has no fit at NFE {missing}; it has {sorted(rows)}")
    return {n: rows[n]["ratios"] for n in nfes}, {n: rows[n]["seconds"] for n in nfes}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default="gaussian", choices=("gaussian", "digits"))
    p.add_argument("--base-solver", default="unipc", choices=("unipc", "dpmsolver++"))
    p.add_argument("--nfe", type=cli.integer(3), nargs="+", default=[5, 6, 8, 10])
    p.add_argument("--model", default=None, choices=tuple(n for n, c in MODEL_CONFIGS.items() if not c[1]),
                   help="an unconditional zoo model instead of a testbed (needs --fits)")
    p.add_argument("--fits", default=None, help="with --model: the folder fit_dc.py wrote")
    p.add_argument("--num-test", type=cli.integer(1), default=64, help="with --model: held-out latents")
    p.add_argument("--threads", type=cli.integer(1), default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    if args.model is not None:
        fitted, seconds = shipped_fits(args.fits, args.nfe, args.base_solver)
        from fastsample import zoo

        unet = zoo.load(args.model)
        model = model_fn(unet)
        test = torch.randn(args.num_test, 1, 32, 32, generator=g)
    else:
        model = testbed(args.testbed)
        train, test = torch.randn(10, 64, generator=g, dtype=F64), torch.randn(200, 64, generator=g, dtype=F64)
        fitted, seconds = {}, {}
        for nfe in args.nfe:
            start = time.time()
            fitted[nfe] = fit_dc_ratios(model, DCSolverScheduler(**SCHEDULER_CONFIG, base_solver=args.base_solver),
                                        train, nfe)
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
