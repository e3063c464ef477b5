"""Fit DC-Solver ratios for a zoo model at several NFE (and guidance scales), then the CPR over them.

    python scripts/fit_dc.py --model fmnist-large --nfe 5 6 8 10 --out dc/fmnist-large
    python scripts/fit_dc.py --model fmnist-cond --nfe 5 8 10 --guidance-scale 1 3 5 --out dc/fmnist-cond

Writes <out>/ratios.jsonl (one fitted ratio list per line: nfe, guidance_scale, ratios, seconds, and the fit's inputs:
model, weights hash, base solver, corrector, latents, iterations, seed; a rerun skips a fit only when all of them
match; the file is locked and written atomically), <out>/cpr.json (over the fits of this configuration) and, per fit, a scheduler folder <out>/nfe<N>-cfg<W> (save_pretrained) that
``DCSolverScheduler.from_pretrained`` loads.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fastsample import cli, commands
from fastsample.sampling import model_fn
from fastsample import zoo
from fastsample.guidance.cfg import ClassifierFreeGuidance
from fastsample.results import ResultsFile
from fastsample.solvers import CPR, DCSolverScheduler, fit_dc_ratios
from fastsample.solvers.dc_solver import FIT_OBJECTIVES
from fastsample.solvers.learned_schedule import model_hash


def fitted(config: dict, weights: str, **fit) -> DCSolverScheduler:
    """A DC-Solver scheduler carrying a fit and the hash of the weights it was fitted to (fitted_model_hash)."""
    return DCSolverScheduler.from_config({**DCSolverScheduler(**config, **fit).config, "fitted_model_hash": weights})


def arguments(p):
    p.add_argument("--model", default="fmnist-large", choices=tuple(zoo.MODEL_CONFIGS))
    p.add_argument("--nfe", type=cli.integer(3), nargs="+", default=[5, 6, 8, 10])
    p.add_argument("--guidance-scale", type=cli.number(0.0), nargs="+", default=[1.0], help="conditional model only")
    p.add_argument("--base-solver", default="unipc", choices=("unipc", "dpmsolver++"))
    p.add_argument("--solver-type", default="bh1", choices=("bh1", "bh2"),
                   help="UniPC base: the corrector's B(h) (bh1 as in the DC-Solver paper; bh2 is diffusers' default)")
    p.add_argument("--num", type=cli.integer(1), default=10, help="fitting latents")
    p.add_argument("--iterations", type=cli.integer(1), default=30)
    p.add_argument("--objective", default="greedy", choices=FIT_OBJECTIVES,
                   help="greedy: each ratio against the teacher's next state (the paper); end: then all ratios jointly "
                        "against the teacher's end point")
    p.add_argument("--end-iterations", type=cli.integer(1), default=60,
                   help="--objective end: full-batch Adam steps of the joint refinement")
    p.add_argument("--leave-one-out", action="store_true",
                   help="also write <out>/cpr-without-nfe<N>: the CPR fitted on the other NFEs' fits, to measure how "
                        "much of the fitted gain it keeps at an NFE it never saw")
    p.add_argument("--out", type=cli.output("dir"), default=None)


def run(args, p):
    if args.objective != "end" and args.end_iterations != p.get_default("end_iterations"):
        p.error("--end-iterations applies to --objective end only")

    out = Path(args.out or f"dc/{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    unet = zoo.load(args.model)
    classes = zoo.MODEL_CONFIGS[args.model][1]
    noise = torch.randn(args.num, 1, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    config = dict(zoo.SCHEDULER_CONFIG, base_solver=args.base_solver)
    if args.base_solver == "unipc":
        config["solver_type"] = args.solver_type
    # what decides a fit besides its NFE and guidance scale: a rerun skips a fit only when all of it matches
    inputs = {"model": args.model, "weights": model_hash(unet), "base_solver": args.base_solver,
              "solver_type": config.get("solver_type"), "num": args.num, "iterations": args.iterations,
              "seed": args.seed, **({"objective": "end", "end_iterations": args.end_iterations}
                                    if args.objective == "end" else {})}
    with ResultsFile(out / "ratios.jsonl", log=print) as log:
        # records written before the option carry no objective: they are greedy fits
        done = [r for r in log.records if all(r.get(k) == v for k, v in inputs.items())
                and r.get("objective", "greedy") == args.objective]
        for w in args.guidance_scale if classes else [1.0]:
            model = (ClassifierFreeGuidance(unet, torch.arange(args.num) % classes, w, zoo.NULL_LABEL) if classes
                     else model_fn(unet))
            for nfe in args.nfe:
                if any(d["nfe"] == nfe and d["guidance_scale"] == w for d in done):
                    continue
                start = time.time()
                ratios = fit_dc_ratios(model, DCSolverScheduler(**config), noise, nfe, iterations=args.iterations,
                                       objective=args.objective, end_iterations=args.end_iterations)
                record = {"nfe": nfe, "guidance_scale": w, "ratios": ratios, "seconds": round(time.time() - start, 1),
                          **inputs}
                log.append(record)
                done.append(record)
                fitted(config, inputs["weights"], dc_ratios=ratios).save_pretrained(out / f"nfe{nfe}-cfg{w:g}")
                print(json.dumps(record), flush=True)
    CPR.fit(done, args.base_solver).save(out / "cpr.json", inputs["weights"])  # over this configuration's fits only
    if args.leave_one_out:
        for nfe in sorted({d["nfe"] for d in done}):
            rest = [d for d in done if d["nfe"] != nfe]
            if rest:
                cpr = CPR.fit(rest, args.base_solver).to_dict()
                fitted(config, inputs["weights"], cpr=cpr).save_pretrained(out / f"cpr-without-nfe{nfe}")
                print(f"CPR without NFE {nfe} -> {out / f'cpr-without-nfe{nfe}'}")
    print(f"CPR over {len(done)} fits -> {out / 'cpr.json'}")


def main(argv=None):
    return commands.standalone(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
