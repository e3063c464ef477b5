"""Scheduler overhead: time of our ``step`` against diffusers' for the same method on the same tensors.

    python scripts/bench_overhead.py [--steps 25] [--repeats 7] [--shape 4 4 64 64] [--device cpu|cuda]

Each row runs set_timesteps + a full loop of ``step`` calls on fixed, precomputed model outputs (no network), for
diffusers' scheduler and ours in the same process, alternating, and reports the median time per loop and the ratio
ours / diffusers (below 1.0 = ours is faster).  On CUDA the loop is synchronised once at its end only.
"""
from __future__ import annotations

import statistics
import time

import torch
from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from fastsample import cli, commands
from fastsample.solvers import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
SHARED = ("threads",)  # the timed tensors are fixed: no --seed

CASES = [
    ("DPM-Solver++ 2M", DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler, {}),
    ("DPM-Solver++ 3M", DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler, {"solver_order": 3}),
    ("DPM-Solver++ 2M Karras", DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler, {"use_karras_sigmas": True}),
    ("SDE-DPM-Solver++ 2M", DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    ("DEIS 3 (logrho)", DEISMultistepScheduler, DEISScheduler, {"solver_order": 3, "solver_type": "logrho"}),
    ("UniPC bh2 2", UniPCMultistepScheduler, UniPCScheduler, {}),
    ("UniPC bh2 3", UniPCMultistepScheduler, UniPCScheduler, {"solver_order": 3}),
]


def loop_time(scheduler, x0, outputs, steps, device, generator):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    scheduler.set_timesteps(steps, device=device)
    x = x0
    kw = {"generator": generator} if "generator" in scheduler.step.__code__.co_varnames else {}
    for t, out in zip(scheduler.timesteps, outputs):
        x = scheduler.step(out, t, x, **kw).prev_sample
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, x


def arguments(p):
    p.add_argument("--steps", type=cli.integer(1), default=25)
    p.add_argument("--repeats", type=cli.integer(1), default=7)
    p.add_argument("--shape", type=cli.integer(1), nargs="+", default=[4, 4, 64, 64])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args, p):
    device = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(*args.shape, generator=g).to(device)
    outputs = [0.5 * torch.randn(*args.shape, generator=g).to(device) for _ in range(args.steps)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"step overhead, {args.steps} steps, latents {tuple(args.shape)} float32, {name}, torch {torch.__version__}")
    print(f"| method | diffusers ms/loop | fastsample ms/loop | ratio |\n|---|---|---|---|")
    for label, theirs_cls, ours_cls, cfg in CASES:
        theirs = theirs_cls(**{k: v for k, v in cfg.items() if not (theirs_cls is DEISMultistepScheduler and k == "solver_type")})
        ours = ours_cls(**cfg)
        times = {"theirs": [], "ours": []}
        for r in range(args.repeats + 1):  # the first round warms up
            for key, s in (("theirs", theirs), ("ours", ours)):
                gen = torch.Generator(device=device).manual_seed(r)
                dt, _ = loop_time(s, x0, outputs, args.steps, device, gen)
                if r:
                    times[key].append(dt)
        t_theirs, t_ours = statistics.median(times["theirs"]), statistics.median(times["ours"])
        print(f"| {label} | {1e3 * t_theirs:.2f} | {1e3 * t_ours:.2f} | {t_ours / t_theirs:.2f}x |")


def main(argv=None):
    return commands.standalone(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
