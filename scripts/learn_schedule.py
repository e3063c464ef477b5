"""Learn time schedules for a zoo model (GITS-style dynamic programming against a many-step teacher).

    python scripts/learn_schedule.py --model fmnist-large --scheduler unipc --nfe 4 5 6 8 10 --out schedules/fmnist-large
    python scripts/learn_schedule.py --model fmnist-cond --guidance-scale 3 --nfe 5 --out schedules/fmnist-cond

Writes <out>/<scheduler>-nfe<N>.json (LearnedSchedule) and a scheduler folder <out>/<scheduler>-nfe<N>/ carrying it
(``learned_timesteps``), and prints the held-out error and the time each fit took.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastsample import make_scheduler, zoo
from fastsample.guidance.cfg import ClassifierFreeGuidance
from fastsample.solvers.learned_schedule import learn_schedule, validation_error


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-large", choices=tuple(zoo.MODEL_CONFIGS))
    p.add_argument("--scheduler", default="unipc", choices=("unipc", "dpmsolver++", "deis"))
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    p.add_argument("--guidance-scale", type=float, default=3.0, help="conditional model only")
    p.add_argument("--num", type=int, default=32, help="fitting latents")
    p.add_argument("--validation", type=int, default=64, help="held-out latents")
    p.add_argument("--fine-steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    unet = zoo.load(args.model)
    classes = zoo.MODEL_CONFIGS[args.model][1]
    g = torch.Generator().manual_seed(args.seed)
    train = torch.randn(args.num, 1, 32, 32, generator=g)
    held_out = torch.randn(args.validation, 1, 32, 32, generator=g)

    def model_for(n):
        if classes:
            return ClassifierFreeGuidance(unet, torch.arange(n) % classes, args.guidance_scale, zoo.NULL_LABEL)
        return lambda x, t: unet(x, t).sample

    out = Path(args.out or f"schedules/{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    for nfe in args.nfe:
        sch = make_scheduler(args.scheduler, **zoo.SCHEDULER_CONFIG, solver_order=args.order)
        start = time.time()
        s = learn_schedule(model_for(args.num), sch, train, nfe, fine_steps=args.fine_steps)
        took = time.time() - start
        s.validation_error = validation_error(model_for(args.validation), sch, s, held_out)
        s.extra.update(model=args.model, fit_seconds=round(took, 1),
                       guidance_scale=args.guidance_scale if classes else None)
        name = f"{args.scheduler}{args.order}-nfe{nfe}"
        s.save(out / f"{name}.json")
        s.scheduler(sch).save_pretrained(out / name)
        print(f"{name}: timesteps {s.timesteps}, held-out error {s.validation_error:.4f}, fit {took:.1f} s", flush=True)


if __name__ == "__main__":
    main()
