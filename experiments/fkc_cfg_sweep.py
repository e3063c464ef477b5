"""FKC classifier-free guidance against plain CFG on the class-conditional zoo model: class accuracy, FID, ESS.

    python experiments/fkc_cfg_sweep.py --scales 3 --steps 20 --per-class 50 --particles 4 8 16 --equal-calls \\
        --out results/fmnist-cond/fkc-cfg.jsonl --table results/fmnist-cond/fkc-cfg.md

Both methods run the same SDE (SDE-DPM-Solver++ 2, ``--steps`` steps, the zoo scheduler) from the same noise.  Plain
CFG makes one particle per image.  FKC runs ``--particles`` weighted particles per image, one group each, and keeps
one drawn by weight, so it spends that many times the model calls per image.  ``--equal-calls`` adds, for each
particle count k, plain CFG with k times the steps: the same model calls per image spent on accuracy instead of on
particles.  Accuracy is the shipped classifier's (binomial standard error); FID is against the train split (bootstrap
standard error).  The smallest ESS is the least effective sample size any image's particle group reached, and the
resampling count how many times a group was resampled, on average per image.

Image i (class i // per-class) starts particle j from noise j * num + i of the seed, so particle 0 starts where plain
CFG does; the SDE's noise comes from a stream of its own per batch.  A cell's key hashes everything that decides it:
the model and its weights, the method, scale, particles, steps, images, seed, clip, batch, the sampler's settings
and the scheduler's config.  Each finished cell is written at once (atomically, under a lock, as the sweep engine
writes), a rerun skips it, and a cut-short last line is repaired.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from fastsample import cli
from fastsample import zoo
from fastsample.guidance.fkc import FKCSampler
from fastsample.metrics import class_accuracy_with_se, fid_with_se
from fastsample.results import ResultsFile, write_atomic
from fastsample.solvers import DPMSolverPlusPlusScheduler
from fastsample.solvers.learned_schedule import model_hash
from fastsample.sweep import config_digest, digest, noise_for

# what FKCSampler runs besides the cell's own settings (its defaults), part of every key; "noise": the recipe of
# start and SDE noise (2: start noise per particle from noise_for, SDE noise from sde_seed)
SAMPLER = {"step": "sde-dpmsolver++", "solver_order": 2, "resampling": "systematic", "ess_threshold": 0.5,
           "resample_start": 0, "sigma_data": 0.5, "noise": 2}


def cells(scales, particles, steps: int, equal_calls: bool, methods, clip):
    """``(scale, method, particles, steps, clip)`` of every cell, in run order: CFG at ``steps``, then per particle
    count FKC and (``equal_calls``) CFG with as many model calls."""
    out = []
    for scale in scales:
        if "cfg" in methods:
            out.append((float(scale), "cfg", 1, steps, None))
        for k in particles:
            if "fkc" in methods:
                out.append((float(scale), "fkc", k, steps, None if clip is None else float(clip)))
            if equal_calls and k > 1:
                out.append((float(scale), "cfg", 1, steps * k, None))
    return list(dict.fromkeys(out))


def identity(model: str, weights: str, scale: float, method: str, particles: int, steps: int, per_class: int,
             seed: int, clip, batch_images: int) -> dict:
    ident = {"model": model, "weights": weights, "scale": float(scale), "method": method, "particles": particles,
             "steps": steps, "num": 10 * per_class, "seed": seed, "clip": None if clip is None else float(clip),
             "batch_images": batch_images, "sampler": SAMPLER,
             "config": config_digest(DPMSolverPlusPlusScheduler(**zoo.SCHEDULER_CONFIG))}
    return {"key": digest(ident), **ident}


def start_indices(images, particles: int, num: int) -> list[int]:
    """The noise indices of the particles of ``images`` (grouped by image): particle j of image i takes j * num + i."""
    return [j * num + i for i in images for j in range(particles)]


def sde_seed(seed: int, first_image: int) -> int:
    """The seed of the SDE's noise (and the resampling) for the batch that starts at ``first_image``: a stream of
    its own, never one of the start noises' generators."""
    return int(digest(["fkc-sde", seed, first_image]), 16) % 2 ** 63


def run_cell(unet, ident: dict) -> dict:
    """Sample the cell's images and score them."""
    k, steps, num = ident["particles"], ident["steps"], ident["num"]
    labels = torch.arange(10).repeat_interleave(num // 10)
    scheduler = DPMSolverPlusPlusScheduler(**zoo.SCHEDULER_CONFIG)
    sampler = FKCSampler(unet, "cfg", guidance_scale=ident["scale"], scheduler=scheduler,
                         weighted=ident["method"] == "fkc", clip=ident["clip"],
                         **{k_: v for k_, v in SAMPLER.items() if k_ != "noise"})
    images, start, min_ess, resampled = [], time.time(), float("inf"), 0
    for b in range(0, num, ident["batch_images"]):
        idx = range(b, min(num, b + ident["batch_images"]))
        lab = labels[b:b + len(idx)].repeat_interleave(k)
        g = torch.Generator().manual_seed(sde_seed(ident["seed"], b))
        noise = noise_for(start_indices(idx, k, num), (1, 32, 32), ident["seed"])
        with torch.no_grad():
            out = sampler.sample(noise, steps, generator=g, num_particles=k, class_labels=lab,
                                 uncond={"class_labels": torch.full_like(lab, zoo.NULL_LABEL)})
        images.append(out.select(g) if k > 1 else out.samples)
        min_ess = min(min_ess, float(out.ess.min()))
        resampled += int(out.resampled.sum())
    x = torch.cat(images).clamp(-1, 1)
    seconds = time.time() - start
    acc, acc_se = class_accuracy_with_se(x, labels)
    value, se = fid_with_se(x)
    return {**ident, "min_ess": None if k == 1 else min_ess, "resamplings_per_image": resampled / num,
            "model_calls_per_image": 2 * steps * k, "seconds": round(seconds, 1), "accuracy": acc,
            "accuracy_se": acc_se, "fid": value, "fid_se": se}


def render(records, table=None) -> str:
    """The table of ``records`` (this run's cells)."""
    lines = ["| guidance | method | particles / image | steps | model calls / image | class accuracy | FID | "
             "smallest ESS | resamplings / image | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["scale"], r["model_calls_per_image"], r["method"], r.get("clip") or 0)):
        name = "FKC-CFG" if r["method"] == "fkc" else "CFG"
        if r.get("clip"):
            name += f", clip {r['clip']:g}"
        fkc = r["method"] == "fkc"
        ess = f"{r['min_ess']:.2f}" if fkc else ""
        res = f"{r['resamplings_per_image']:.1f}" if fkc else ""
        lines.append(f"| {r['scale']:g} | {name} | {r['particles']} | {r['steps']} | {r['model_calls_per_image']} | "
                     f"{100 * r['accuracy']:.1f}% ± {100 * r['accuracy_se']:.1f} | {r['fid']:.2f} ± {r['fid_se']:.2f} "
                     f"| {ess} | {res} | {r['seconds']:.0f} |")
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
    ap.add_argument("--particles", type=cli.integer(2), nargs="+", default=[4, 8, 16],
                    help="FKC's particles per image (plain CFG has one)")
    ap.add_argument("--equal-calls", action="store_true",
                    help="also plain CFG with particles x steps steps (the FKC cell's model calls)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip", type=cli.number(0.0, open_min=True), default=None, help="FKC: clamp centred log-weight increments")
    ap.add_argument("--batch-images", type=cli.integer(1), default=50, help="images per batch (times particles for FKC)")
    ap.add_argument("--threads", type=cli.integer(1), default=None)
    ap.add_argument("--out", type=cli.output("file", (".jsonl",)), default="results/fmnist-cond/fkc-cfg.jsonl")
    ap.add_argument("--table", type=cli.output("file", (".md",)), default=None)
    args = ap.parse_args(argv)
    if args.equal_calls and "cfg" not in args.methods:
        ap.error(f"--equal-calls adds plain CFG cells: it needs 'cfg' in --methods, got {args.methods}")
    if args.clip is not None and "fkc" not in args.methods:
        ap.error(f"--clip applies to FKC only: it needs 'fkc' in --methods, got {args.methods}")
    horizon = zoo.SCHEDULER_CONFIG.get("num_train_timesteps", 1000)
    longest = args.steps * (max(args.particles) if args.equal_calls else 1)
    if longest > horizon:
        ap.error(f"--steps {args.steps}{' x --particles ' + str(max(args.particles)) if args.equal_calls else ''} "
                 f"= {longest} steps, more than the model's {horizon} training timesteps")
    if args.threads:
        torch.set_num_threads(args.threads)
    if zoo.MODEL_CONFIGS[zoo.check_name(args.model)][1] is None:
        raise ValueError(f"--model must be class-conditional, got {args.model!r}")
    unet = zoo.load(args.model)
    weights = model_hash(unet)
    keys = []
    with ResultsFile(args.out, log=print) as f:
        for scale, method, k, steps, clip in cells(args.scales, args.particles, args.steps, args.equal_calls,
                                                   args.methods, args.clip):
            ident = identity(args.model, weights, scale, method, k, steps, args.per_class, args.seed, clip,
                             args.batch_images)
            keys.append(ident["key"])
            if ident["key"] in f.keys():
                continue
            rec = run_cell(unet, ident)
            f.append(rec)
            print(json.dumps({k_: v for k_, v in rec.items() if k_ not in ("key", "weights", "config", "sampler")}),
                  flush=True)
        by_key = {r.get("key"): r for r in f.records}
    print(render([by_key[k] for k in keys], args.table))


if __name__ == "__main__":
    main()
