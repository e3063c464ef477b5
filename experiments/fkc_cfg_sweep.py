"""FKC classifier-free guidance against plain CFG on the class-conditional zoo model: class accuracy and FID.

    python experiments/fkc_cfg_sweep.py --scales 1.5 3 5 --steps 25 --per-class 100 --particles 4 \\
        --out results/fkc-cfg.jsonl --table results/fkc-cfg.md

Both methods run the same SDE (SDE-DPM-Solver++ 2, ``--steps`` steps, the zoo scheduler) from the same noise.  Plain
CFG makes one particle per image.  FKC runs ``--particles`` weighted particles per image, one group each, and keeps
one drawn by weight, so it spends that many times the model calls per image (the table says how many).  Accuracy is
the shipped classifier's; FID is against the train split.  Each finished cell is appended to the JSONL, and a rerun
skips it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastsample import cli
from fastsample import zoo
from fastsample.guidance.fkc import FKCSampler
from fastsample.metrics import class_accuracy, fid
from fastsample.solvers import DPMSolverPlusPlusScheduler
from fastsample.sweep import read_records


def run_cell(unet, scale: float, method: str, steps: int, per_class: int, particles: int, seed: int,
             batch_images: int, clip: float | None = None) -> dict:
    k = particles if method == "fkc" else 1
    labels = torch.arange(10).repeat_interleave(per_class)
    scheduler = DPMSolverPlusPlusScheduler(**zoo.SCHEDULER_CONFIG)
    sampler = FKCSampler(unet, "cfg", guidance_scale=scale, scheduler=scheduler, weighted=method == "fkc", clip=clip)
    images, start, min_ess = [], time.time(), float("inf")
    for b in range(0, len(labels), batch_images):
        lab = labels[b:b + batch_images].repeat_interleave(k)
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        noise = torch.randn(len(lab), 1, 32, 32, generator=g)
        with torch.no_grad():
            out = sampler.sample(noise, steps, generator=g, num_particles=k, class_labels=lab,
                                 uncond={"class_labels": torch.full_like(lab, zoo.NULL_LABEL)})
        images.append(out.select(g) if k > 1 else out.samples)
        min_ess = min(min_ess, float(out.ess.min()))
    x = torch.cat(images).clamp(-1, 1)
    seconds = time.time() - start
    return {"scale": scale, "method": method, "particles": k, "steps": steps, "num": len(labels), "seed": seed,
            "clip": clip if method == "fkc" else None, "min_ess": None if k == 1 else min_ess,
            "model_calls_per_image": 2 * steps * k, "seconds": round(seconds, 1),
            "accuracy": class_accuracy(x, labels), "fid": fid(x)}


def render(records, table=None) -> str:
    lines = ["| guidance | method | particles / image | model calls / image | class accuracy | FID | s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["scale"], r["method"], r.get("clip") or 0)):
        name = "FKC-CFG" if r["method"] == "fkc" else "CFG"
        if r.get("clip"):
            name += f", clip {r['clip']:g}"
        lines.append(f"| {r['scale']:g} | {name} | {r['particles']} | {r['model_calls_per_image']} | "
                     f"{100 * r['accuracy']:.1f}% | {r['fid']:.2f} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    if table:
        Path(table).write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-cond")
    ap.add_argument("--scales", nargs="+", type=cli.number(0.0), default=[1.5, 3.0, 5.0])
    ap.add_argument("--methods", nargs="+", default=["cfg", "fkc"], choices=["cfg", "fkc"])
    ap.add_argument("--steps", type=cli.integer(1), default=25)
    ap.add_argument("--per-class", type=cli.integer(1), default=100)
    ap.add_argument("--particles", type=cli.integer(1), default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip", type=cli.number(0.0, open_min=True), default=None, help="FKC: clamp centred log-weight increments")
    ap.add_argument("--batch-images", type=cli.integer(1), default=100, help="images per batch (times particles for FKC)")
    ap.add_argument("--threads", type=cli.integer(1), default=None)
    ap.add_argument("--out", type=cli.output("file", (".jsonl",)), default="results/fkc-cfg.jsonl")
    ap.add_argument("--table", type=cli.output("file", (".md",)), default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if zoo.MODEL_CONFIGS[zoo.check_name(args.model)][1] is None:
        raise ValueError(f"--model must be class-conditional, got {args.model!r}")
    unet = zoo.load(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["scale"], r["method"], r["particles"], r["steps"], r["num"], r["seed"], r.get("clip"))
            for r in read_records(out)}
    for scale in args.scales:
        for method in args.methods:
            k = args.particles if method == "fkc" else 1
            clip = args.clip if method == "fkc" else None
            if (scale, method, k, args.steps, 10 * args.per_class, args.seed, clip) in done:
                continue
            rec = run_cell(unet, scale, method, args.steps, args.per_class, args.particles, args.seed,
                           args.batch_images, clip)
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
    print(render(read_records(out), args.table))


if __name__ == "__main__":
    main()
