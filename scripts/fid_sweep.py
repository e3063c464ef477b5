"""Quality against the number of model calls: a resumable sweep over schedulers x NFE.

    python scripts/fid_sweep.py --model fmnist-large --nfe 5 6 8 10 15 20 --num 5000 --out results/fmnist-large.jsonl
    python scripts/fid_sweep.py --model testbed --nfe 5 10 20 --num 512            # exact testbed: trajectory error
    accelerate launch scripts/fid_sweep.py ...                                     # shards across processes/GPUs

Sample i always starts from the noise of generator seed (seed, i), so a cell's samples are the same whatever the
batch size or process count.  Each finished cell is appended to the JSONL at once; a rerun skips finished cells, so an
interrupted sweep loses at most the cell in progress.  ``--plot`` and ``--table`` render the JSONL (metric vs NFE, one
line per scheduler, log axes; a markdown table).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

SCHEDULERS = {
    # name: (source, class name, config)
    "ddim": ("ours", "DPMSolverPlusPlusScheduler", {"solver_order": 1}),
    "dpm++2m": ("ours", "DPMSolverPlusPlusScheduler", {"solver_order": 2}),
    "dpm++3m": ("ours", "DPMSolverPlusPlusScheduler", {"solver_order": 3}),
    "dpm++3m-exact": ("ours", "DPMSolverPlusPlusScheduler", {"solver_order": 3, "third_order": "exact"}),
    "deis-tab3": ("ours", "DEISScheduler", {"solver_order": 3}),
    "unipc3": ("ours", "UniPCScheduler", {"solver_order": 3}),
    "diffusers-ddim": ("diffusers", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
    "diffusers-dpm++2m": ("diffusers", "DPMSolverMultistepScheduler", {"solver_order": 2}),
    "diffusers-dpm++3m": ("diffusers", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    "diffusers-deis": ("diffusers", "DEISMultistepScheduler", {"solver_order": 3}),
    "diffusers-unipc": ("diffusers", "UniPCMultistepScheduler", {"solver_order": 3}),
}
DEFAULT_SCHEDULERS = list(SCHEDULERS)


def make_scheduler(name: str):
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {tuple(SCHEDULERS)}, got {name!r}")
    source, cls_name, cfg = SCHEDULERS[name]
    import diffusers

    import fastsample.solvers

    module = fastsample.solvers if source == "ours" else diffusers
    from fastsample.zoo import SCHEDULER_CONFIG

    return getattr(module, cls_name)(**SCHEDULER_CONFIG, **cfg)


def noise_for(indices, shape, seed: int) -> torch.Tensor:
    """Per-sample noise: sample i from its own generator, whatever the batching."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices])


class Task:
    """What is sampled and how it is scored: a zoo model (FID) or the exact testbed (trajectory error)."""

    def __init__(self, model: str, device):
        from fastsample import zoo

        self.name, self.device = model, device
        if model == "testbed":
            from fastsample.schedules import DiscreteVP, make_betas
            from fastsample.testbeds import GaussianMixture

            self.testbed = GaussianMixture.random(dim=16, components=6, seed=0, schedule=DiscreteVP(make_betas()))
            self.shape, self.metric = (16,), "trajectory_error"
            self.model = self.testbed
        else:
            unet = zoo.load(model, device=device)
            if zoo.MODEL_CONFIGS[model][1]:
                raise ValueError("use fmnist-small or fmnist-large here; guided sweeps take the conditional model")
            self.shape, self.metric = (1, 32, 32), "fid"
            self.model = lambda x, t: unet(x, t).sample

    def score(self, samples, noise, scheduler) -> float:
        if self.metric == "fid":
            from fastsample.metrics import fid

            return fid(samples.cpu())
        s0, s1 = float(scheduler.sigmas[0]), float(scheduler.sigmas[-1])
        exact = self.testbed.exact_solution(noise.double(), s0, s1, 1 / math.sqrt(1 + s0 ** 2), 1 / math.sqrt(1 + s1 ** 2))
        from fastsample.metrics import trajectory_error

        return trajectory_error(samples, exact)


def run_cell(task: Task, sched_name: str, nfe: int, num: int, seed: int, batch_size: int, acc) -> dict:
    from fastsample import sample

    scheduler = make_scheduler(sched_name)
    mine = list(range(acc.process_index, num, acc.num_processes))
    outs, start = [], time.time()
    for b in range(0, len(mine), batch_size):
        idx = mine[b:b + batch_size]
        noise = noise_for(idx, task.shape, seed).to(task.device)
        with torch.no_grad():
            x, calls = sample(task.model, noise, scheduler=scheduler, num_inference_steps=nfe, progress=False)
        outs.append(torch.cat([torch.tensor(idx, dtype=torch.float64).view(-1, 1), x.double().flatten(1).cpu()], 1))
    local = torch.cat(outs) if outs else torch.zeros(0, 1 + math.prod(task.shape), dtype=torch.float64)
    gathered = acc.gather_for_metrics(local.to(acc.device)).cpu() if acc.num_processes > 1 else local
    gathered = gathered[gathered[:, 0].argsort()]
    samples = gathered[:, 1:].reshape(-1, *task.shape).float()
    record = {"model": task.name, "scheduler": sched_name, "nfe": nfe, "num": num, "seed": seed,
              "model_calls": calls, "seconds": round(time.time() - start, 1)}
    if acc.is_main_process:
        noise = noise_for(range(num), task.shape, seed)
        record[task.metric] = task.score(samples, noise, scheduler)
    return record


def done_cells(path: Path) -> set:
    if not path.is_file():
        return set()
    return {(r["scheduler"], r["nfe"], r["num"], r["seed"]) for r in map(json.loads, path.read_text().splitlines()) if r}


def render(path: Path, plot: Path | None, table: Path | None):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metric = "fid" if "fid" in rows[0] else "trajectory_error"
    by = {}
    for r in rows:
        by.setdefault(r["scheduler"], {})[r["nfe"]] = r[metric]
    nfes = sorted({r["nfe"] for r in rows})
    if table:
        lines = [f"| scheduler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
        for name, vals in by.items():
            lines.append(f"| {name} | " + " | ".join(f"{vals[n]:.4g}" if n in vals else "" for n in nfes) + " |")
        table.write_text("\n".join(lines) + "\n")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, vals in by.items():
            xs = sorted(vals)
            ax.plot(xs, [vals[x] for x in xs], marker="o", label=name, linestyle="--" if name.startswith("diffusers") else "-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model calls (NFE)")
        ax.set_ylabel(metric)
        ax.set_title(f"{rows[0]['model']}: {metric} vs NFE")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-large")
    p.add_argument("--schedulers", nargs="+", default=DEFAULT_SCHEDULERS)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10, 15, 20])
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--table", default=None)
    args = p.parse_args(argv)
    for s in args.schedulers:
        if s not in SCHEDULERS:
            p.error(f"scheduler must be one of {tuple(SCHEDULERS)}, got {s!r}")
    if min(args.nfe) < 1:
        p.error(f"--nfe values must be >= 1, got {args.nfe}")
    from accelerate import Accelerator

    acc = Accelerator()
    out = Path(args.out or f"results/{args.model}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    task = Task(args.model, acc.device)
    finished = done_cells(out)
    for name in args.schedulers:
        for nfe in args.nfe:
            if (name, nfe, args.num, args.seed) in finished:
                continue
            record = run_cell(task, name, nfe, args.num, args.seed, args.batch_size, acc)
            if acc.is_main_process:
                with out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
    if acc.is_main_process and (args.plot or args.table):
        render(out, Path(args.plot) if args.plot else None, Path(args.table) if args.table else None)


if __name__ == "__main__":
    main()
