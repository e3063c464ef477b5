"""Quality against the number of model calls: a resumable sweep over schedulers x NFE (``scripts/fid_sweep.py`` is
its command line).

Sample i always starts from the noise of its own generator, seeded with (seed, i), so a cell's samples are the same
whatever the batch size or the number of processes.  Each finished cell is appended to a JSONL file at once; a rerun
skips finished cells, so an interrupted sweep loses at most the cell in progress.  Under ``accelerate launch`` each
process samples its shard and the metric is computed once, on the main process.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .sampling import sample

# name: (source, class name, config).  Ours and diffusers' versions of the same methods, on the zoo's training config.
SCHEDULERS = {
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
DEFAULT_SCHEDULERS = tuple(n for n in SCHEDULERS if n != "dpm++3m-exact")
FLOOR = "floor"          # the converged reference cell: UniPC-3 with many steps
FLOOR_SCHEDULER = "unipc3"
TESTBED = "testbed"


def make_named_scheduler(name: str):
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {tuple(SCHEDULERS)}, got {name!r}")
    import diffusers

    import fastsample.solvers

    from .zoo import SCHEDULER_CONFIG

    source, cls_name, cfg = SCHEDULERS[name]
    return getattr(fastsample.solvers if source == "ours" else diffusers, cls_name)(**SCHEDULER_CONFIG, **cfg)


def noise_for(indices, shape, seed: int) -> torch.Tensor:
    """Per-sample noise: sample i from its own generator, whatever the batching."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices])


class Task:
    """What is sampled and how it is scored: a zoo model (FID) or the exact testbed (trajectory error against the
    exact probability-flow ODE solution)."""

    def __init__(self, model: str, device="cpu"):
        from . import zoo

        self.name, self.device = model, device
        if model == TESTBED:
            from .schedules import DiscreteVP, make_betas
            from .testbeds import GaussianMixture

            self.testbed = GaussianMixture.random(dim=16, components=6, seed=0, schedule=DiscreteVP(make_betas()))
            self.shape, self.metric, self.model = (16,), "trajectory_error", self.testbed
            self._exact = {}  # (noise digest, sigma_from, sigma_to) -> exact ODE end point, shared by the cells
            return
        if model not in zoo.MODEL_CONFIGS:
            raise ValueError(f"model must be one of {(TESTBED,) + tuple(zoo.MODEL_CONFIGS)}, got {model!r}")
        if zoo.MODEL_CONFIGS[model][1]:
            raise ValueError(f"model {model!r} is class-conditional; sweep an unconditional one "
                             f"({', '.join(n for n, c in zoo.MODEL_CONFIGS.items() if not c[1])})")
        unet = zoo.load(model, device=device)
        self.shape, self.metric = (1, 32, 32), "fid"
        self.model = lambda x, t: unet(x, t).sample

    def score(self, samples: torch.Tensor, noise: torch.Tensor, scheduler) -> float:
        if self.metric == "fid":
            from .metrics import fid

            return fid(samples.cpu())
        from .metrics import trajectory_error

        # the reference is the exact ODE solution over the interval the scheduler integrates: from its first timestep
        # (diffusers' DDIM "leading" spacing starts below 999) to its last sigma (DEIS stops at sigma_min; DDIM, with
        # set_alpha_to_one, at clean data)
        t0 = int(scheduler.timesteps[0])
        alpha0 = float(self.testbed.schedule.alpha_sigma(torch.tensor(float(t0), dtype=torch.float64))[0])
        s0 = math.sqrt(1 - alpha0 ** 2) / alpha0
        s1 = float(scheduler.sigmas[-1]) if hasattr(scheduler, "sigmas") else 0.0
        x_T = noise.double()
        key = (hash(x_T.numpy().tobytes()), t0, s1)
        if key not in self._exact:  # rtol 1e-9: far below any error a cell measures
            self._exact[key] = self.testbed.exact_solution(x_T, s0, s1, alpha0, 1 / math.sqrt(1 + s1 ** 2), rtol=1e-9)
        return trajectory_error(samples, self._exact[key])


class _OneProcess:
    num_processes, process_index, is_main_process = 1, 0, True


def run_cell(task: Task, sched_name: str, nfe: int, num: int, seed: int = 0, batch_size: int = 250,
             acc=None) -> dict:
    """Sample ``num`` images (this process's shard of them under accelerate) and score them: one JSONL record."""
    acc = acc or _OneProcess()
    scheduler = make_named_scheduler(FLOOR_SCHEDULER if sched_name == FLOOR else sched_name)
    mine = list(range(acc.process_index, num, acc.num_processes))
    outs, calls, start = [], 0, time.time()
    for b in range(0, len(mine), batch_size):
        idx = mine[b:b + batch_size]
        noise = noise_for(idx, task.shape, seed).to(task.device)
        with torch.no_grad():
            x, calls = sample(task.model, noise, scheduler=scheduler, num_inference_steps=nfe, progress=False)
        outs.append(torch.cat([torch.tensor(idx, dtype=torch.float64).view(-1, 1), x.double().flatten(1).cpu()], 1))
    width = 1 + math.prod(task.shape)
    local = torch.cat(outs) if outs else torch.zeros(0, width, dtype=torch.float64)
    if acc.num_processes > 1:  # shards differ in size by at most one: pad with index -1, gather, drop the padding
        pad = torch.full((math.ceil(num / acc.num_processes) - len(local), width), -1.0, dtype=torch.float64)
        gathered = acc.gather(torch.cat([local, pad]).to(acc.device)).cpu()
        local = gathered[gathered[:, 0] >= 0]
    local = local[local[:, 0].argsort()]
    record = {"model": task.name, "scheduler": sched_name, "nfe": nfe, "num": num, "seed": seed,
              "model_calls": calls, "seconds": round(time.time() - start, 1)}
    if acc.is_main_process:
        samples = local[:, 1:].reshape(-1, *task.shape).float()
        record[task.metric] = task.score(samples, noise_for(range(num), task.shape, seed), scheduler)
    return record


def read_records(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sweep(model: str, schedulers, nfes, num: int, out, seed: int = 0, batch_size: int = 250,
              floor_nfe: int | None = None, device="cpu", acc=None, log=print) -> list[dict]:
    """Every (scheduler, NFE) cell not yet in ``out``, appended as it finishes; the floor cell last."""
    for s in schedulers:
        if s not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {tuple(SCHEDULERS)}, got {s!r}")
    for n in list(nfes) + ([floor_nfe] if floor_nfe is not None else []):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"NFE values must be integers >= 1 (every solver here takes any NFE from 1), got {n!r}")
    acc = acc or _OneProcess()
    out = Path(out)
    task = Task(model, device)
    done = {(r["scheduler"], r["nfe"], r["num"], r["seed"]) for r in read_records(out)}
    cells = [(s, n) for s in schedulers for n in nfes] + ([(FLOOR, floor_nfe)] if floor_nfe is not None else [])
    for name, nfe in cells:
        if (name, nfe, num, seed) in done:
            continue
        record = run_cell(task, name, nfe, num, seed, batch_size, acc)
        if acc.is_main_process:
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log(json.dumps(record))
    return read_records(out)


def render(records: list[dict], plot=None, table=None) -> str:
    """A markdown table (one row per scheduler, one column per NFE) and, with ``plot``, a PNG of the metric against
    NFE on log axes with the floor as a horizontal line."""
    metric = "fid" if any("fid" in r for r in records) else "trajectory_error"
    by, floor = {}, None
    for r in records:
        if r["scheduler"] == FLOOR:
            floor = r
        else:
            by.setdefault(r["scheduler"], {})[r["nfe"]] = r[metric]
    nfes = sorted({n for vals in by.values() for n in vals})
    lines = ["| scheduler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for name, vals in by.items():
        lines.append(f"| {name} | " + " | ".join(f"{vals[n]:.4g}" if n in vals else "" for n in nfes) + " |")
    text = "\n".join(lines) + "\n"
    if floor is not None:
        text += f"\nConverged floor ({FLOOR_SCHEDULER} at {floor['nfe']} NFE): {metric} {floor[metric]:.4g}\n"
    if table:
        Path(table).write_text(text)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, vals in by.items():
            xs = sorted(vals)
            ax.plot(xs, [vals[x] for x in xs], marker="x" if name.startswith("diffusers") else "o", label=name,
                    linestyle="--" if name.startswith("diffusers") else "-")
        if floor is not None:
            ax.axhline(floor[metric], color="k", linewidth=0.8, label=f"floor ({floor['nfe']} NFE)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.set_xlabel("model calls (NFE)")
        ax.set_ylabel(metric)
        ax.set_title(f"{records[0]['model']}: {metric} vs NFE ({records[0]['num']} samples a cell)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
    return text
