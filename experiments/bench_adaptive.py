"""Adaptive step size: fastsample's multistep embedded pairs against k-diffusion's sample_dpm_adaptive
(DPM-Solver-23 and -12), in one run, on exact-score testbeds (VE Gaussian mixtures, sigma 80 -> 0.002).

    python experiments/bench_adaptive.py [--out results/adaptive.jsonl] [--table results/adaptive.md]

For each tolerance (atol = rtol / 6.4, k-diffusion's default ratio) it records each sampler's NFE and the relative
error of the end point against the exact solution, then interpolates every sampler's error-against-NFE curve
(log-log) to the NFE that reaches an error of 1e-3 and prints its ratio to k-diffusion's best.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from fastsample import cli
from fastsample import k_diffusion as F
from fastsample.k_diffusion import import_k_diffusion_sampling
from fastsample.testbeds import GaussianMixture

RTOLS = [0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005]
TARGET = 1e-3
OURS = ["unipc3", "dpm++3m", "unipc2"]


def k_diffusion_sampling():
    module = import_k_diffusion_sampling()
    if module is None:
        raise SystemExit("k-diffusion is not installed: pip install --no-deps k-diffusion torchdiffeq")
    return module


def testbeds():
    return {"mixture-16d": GaussianMixture.random(dim=16, components=3, seed=2, spread=1.5),
            "image-like-64d": GaussianMixture.image_like(dim=64, seed=1)}


def nfe_at(points, target=TARGET):
    """The NFE at which a sampler's (nfe, error) curve reaches ``target``, interpolated log-log between the two
    runs that bracket it (None when no run reaches it or none is above it)."""
    pts = sorted(points)
    for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
        if e0 >= target >= e1 and e0 > e1:
            w = (math.log(e0) - math.log(target)) / (math.log(e0) - math.log(e1))
            return math.exp(math.log(n0) + w * (math.log(n1) - math.log(n0)))
    return None


def run(num: int, seed: int):
    K = k_diffusion_sampling()
    records = []
    for name, gm in testbeds().items():
        model = lambda x, s, gm=gm: gm.denoise(x, float(s.reshape(-1)[0]))  # noqa: E731
        x = torch.randn(num, gm.means.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 80
        exact = gm.exact_solution(x, 80.0, 0.002)
        err = lambda y: float((y - exact).norm() / exact.norm())  # noqa: E731
        for rtol in RTOLS:
            kw = dict(rtol=rtol, atol=rtol / 6.4, return_info=True, disable=True)
            for order in (3, 2):
                y, info = K.sample_dpm_adaptive(model, x.clone(), 0.002, 80.0, order=order, **kw)
                records.append({"testbed": name, "sampler": f"k-diffusion dpm_adaptive order {order}", "rtol": rtol,
                                "nfe": info["nfe"], "rejected": info["n_reject"], "error": err(y)})
            for solver in OURS:
                y, info = F.sample_dpm_adaptive(model, x.clone(), 0.002, 80.0, solver=solver, **kw)
                records.append({"testbed": name, "sampler": f"fastsample {solver}", "rtol": rtol, "nfe": info["nfe"],
                                "rejected": info["n_reject"], "error": err(y)})
    return records


def summary(records) -> tuple[str, dict]:
    lines, ratios = [], {}
    for bed in dict.fromkeys(r["testbed"] for r in records):
        rows = [r for r in records if r["testbed"] == bed]
        samplers = list(dict.fromkeys(r["sampler"] for r in rows))
        at = {s: nfe_at([(r["nfe"], r["error"]) for r in rows if r["sampler"] == s]) for s in samplers}
        kd = min((v for s, v in at.items() if s.startswith("k-diffusion") and v), default=None)
        lines += [f"### {bed}", "", "| sampler | " + " | ".join(f"rtol {t:g}" for t in RTOLS)
                  + f" | NFE at error {TARGET:g} | / k-diffusion's best |", "|---" * (len(RTOLS) + 3) + "|"]
        for s in samplers:
            cells = []
            for t in RTOLS:
                r = next(r for r in rows if r["sampler"] == s and r["rtol"] == t)
                cells.append(f"{r['nfe']} / {r['error']:.1e}")
            ratio = at[s] / kd if at[s] and kd else None
            ratios[(bed, s)] = ratio
            lines.append(f"| {s} | " + " | ".join(cells) + f" | {at[s]:.1f} | {ratio:.2f}x |" if at[s] and ratio
                         else f"| {s} | " + " | ".join(cells) + " | not reached | |")
        lines.append("")
    head = ("Adaptive step size on exact testbeds: NFE / relative end-point error at each rtol (atol = rtol / 6.4), "
            "sigma 80 -> 0.002 (python experiments/bench_adaptive.py)\n\n")
    return head + "\n".join(lines), ratios


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=cli.integer(1), default=64, help="noises per testbed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=cli.output("file", (".jsonl",)), default="results/adaptive.jsonl")
    p.add_argument("--table", type=cli.output("file", (".md",)), default="results/adaptive.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    records = run(args.num, args.seed)
    text, ratios = summary(records)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    Path(args.table).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
