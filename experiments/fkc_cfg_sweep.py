"""FKC classifier-free guidance against plain CFG on the class-conditional zoo model: class accuracy, FID, ESS.

    python experiments/fkc_cfg_sweep.py --scales 3 --steps 20 --per-class 50 --particles 4 8 16 --equal-calls \\
        --out results/fkc-cfg.jsonl --table results/fkc-cfg.md

Both methods run the same SDE (SDE-DPM-Solver++ 2, ``--steps`` steps, the zoo scheduler) from the same noise.  Plain
CFG makes one particle per image.  FKC runs ``--particles`` weighted particles per image, one group each, and keeps
one drawn by weight, so it spends that many times the model calls per image.  ``--equal-calls`` adds, for each
particle count k, plain CFG with k times the steps: the same model calls per image spent on accuracy instead of on
particles.  Accuracy is the shipped classifier's (binomial standard error); FID is against the train split (bootstrap
standard error); the smallest ESS is the least effective sample size any image's particle group reached in the run.

A cell's key hashes everything that decides it: the model and its weights, the method, guidance scale, particles,
steps, images, seed, clip, batch and the scheduler's config.  Each finished cell is written at once (atomically,
under a lock, as the sweep engine writes), a rerun skips it, and a cut-short last line is repaired.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from fastsample import cli
from fastsample import zoo
from fastsample.guidance.fkc import FKCSampler
from fastsample.metrics import class_accuracy, fid_with_se
from fastsample.results import ResultsFile
from fastsample.solvers import DPMSolverPlusPlusScheduler
from fastsample.solvers.learned_schedule import model_hash
from fastsample.sweep import _digest, config_digest, noise_for


def cells(scales, particles, steps: int, equal_calls: bool, methods, clip):
    """``(scale, method, particles, steps, clip)`` of every cell, in run order: CFG at ``steps``, then per particle
    count FKC and (``equal_calls``) CFG with as many model calls."""
    out = []
    for scale in scales:
        if "cfg" in methods:
            out.append((scale, "cfg", 1, steps, None))
        for k in particles:
            if "fkc" in methods:
                out.append((scale, "fkc", k, steps, clip))
            if equal_calls and "cfg" in methods and k > 1:
                out.append((scale, "cfg", 1, steps * k, None))
    return list(dict.fromkeys(out))


def identity(model: str, weights: str, scale: float, method: str, particles: int, steps: int, per_class: int,
             seed: int, clip, batch_images: int) -> dict:
    ident = {"model": model, "weights": weights, "scale": scale, "method": method, "particles": particles,
             "steps": steps, "num": 10 * per_class, "seed": seed, "clip": clip, "batch_images": batch_images,
             "config": config_digest(DPMSolverPlusPlusScheduler(**zoo.SCHEDULER_CONFIG))}
    return {"key": _digest(ident), **ident}


def run_cell(unet, ident: dict) -> dict:
    """Sample the cell's images (image i: class i // per_class, start noise i of the seed) and score them."""
    k, steps, scale = ident["particles"], ident["steps"], ident["scale"]
    labels = torch.arange(10).repeat_interleave(ident["num"] // 10)
    scheduler = DPMSolverPlusPlusScheduler(**zoo.SCHEDULER_CONFIG)
    sampler = FKCSampler(unet, "cfg", guidance_scale=scale, scheduler=scheduler, weighted=ident["method"] == "fkc",
                         clip=ident["clip"])
    images, start, min_ess = [], time.time(), float("inf")
    for b in range(0, len(labels), ident["batch_images"]):
        idx = range(b, min(len(labels), b + ident["batch_images"]))
        lab = labels[b:b + len(idx)].repeat_interleave(k)
        g = torch.Generator().manual_seed(ident["seed"] * 1_000_003 + b)
        # particle j of image i starts from noise j * num + i of the seed: particle 0 from plain CFG's start
        noise = noise_for([j * len(labels) + i for i in idx for j in range(k)], (1, 32, 32), ident["seed"])
        with torch.no_grad():
            out = sampler.sample(noise, steps, generator=g, num_particles=k, class_labels=lab,
                                 uncond={"class_labels": torch.full_like(lab, zoo.NULL_LABEL)})
        images.append(out.select(g) if k > 1 else out.samples)
        min_ess = min(min_ess, float(out.ess.min()))
    x = torch.cat(images).clamp(-1, 1)
    seconds = time.time() - start
    acc = class_accuracy(x, labels)
    value, se = fid_with_se(x)
    return {**ident, "min_ess": None if k == 1 else min_ess, "model_calls_per_image": 2 * steps * k,
            "seconds": round(seconds, 1), "accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / len(labels)),
            "fid": value, "fid_se": se}


def render(records, weights: str | None = None, table=None) -> str:
    """The table of the records of ``weights`` (all when None)."""
    from fastsample.results import write_atomic

    lines = ["| guidance | method | particles / image | steps | model calls / image | class accuracy | FID | "
             "smallest ESS | s |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [r for r in records if weights is None or r.get("weights") == weights]
    for r in sorted(rows, key=lambda r: (r["scale"], r["model_calls_per_image"], r["method"], r.get("clip") or 0)):
        name = "FKC-CFG" if r["method"] == "fkc" else "CFG"
        if r.get("clip"):
            name += f", clip {r['clip']:g}"
        ess = "" if r.get("min_ess") is None else f"{r['min_ess']:.2f}"
        lines.append(f"| {r['scale']:g} | {name} | {r['particles']} | {r['steps']} | {r['model_calls_per_image']} | "
                     f"{100 * r['accuracy']:.1f}% ± {100 * r['accuracy_se']:.1f} | {r['fid']:.2f} ± {r['fid_se']:.2f} "
                     f"| {ess} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    if table:
        write_atomic(table, text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-cond")
    ap.add_argument("--scales", nargs="+", type=cli.number(0.0), default=[3.0])
    ap.add_argument("--methods", nargs="+", default=["cfg", "fkc"], choices=["cfg", "fkc"])
    ap.add_argument("--steps", type=cli.integer(1), default=20)
    ap.add_argument("--per-class", type=cli.integer(1), default=50)
    ap.add_argument("--particles", type=cli.integer(1), nargs="+", default=[4, 8, 16])
    ap.add_argument("--equal-calls", action="store_true",
                    help="also plain CFG with particles x steps steps (the FKC cell's model calls)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip", type=cli.number(0.0, open_min=True), default=None, help="FKC: clamp centred log-weight increments")
    ap.add_argument("--batch-images", type=cli.integer(1), default=50, help="images per batch (times particles for FKC)")
    ap.add_argument("--threads", type=cli.integer(1), default=None)
    ap.add_argument("--out", type=cli.output("file", (".jsonl",)), default="results/fkc-cfg.jsonl")
    ap.add_argument("--table", type=cli.output("file", (".md",)), default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if zoo.MODEL_CONFIGS[zoo.check_name(args.model)][1] is None:
        raise ValueError(f"--model must be class-conditional, got {args.model!r}")
    unet = zoo.load(args.model)
    weights = model_hash(unet)
    with ResultsFile(args.out, log=print) as f:
        for scale, method, k, steps, clip in cells(args.scales, args.particles, args.steps, args.equal_calls,
                                                   args.methods, args.clip):
            ident = identity(args.model, weights, scale, method, k, steps, args.per_class, args.seed, clip,
                             args.batch_images)
            if ident["key"] in f.keys():
                continue
            rec = run_cell(unet, ident)
            f.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k not in ("key", "weights", "config")}), flush=True)
        records = f.records
    print(render(records, weights, args.table))


if __name__ == "__main__":
    main()
