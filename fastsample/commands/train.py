"""Train a Fashion-MNIST UNet2DModel (VP, diffusers' linear betas, 1000 steps, epsilon prediction) with EMA weights.

    python scripts/train.py --model fmnist-large --steps 60000 --threads 1   # resumes from checkpoints/fmnist-large
    python scripts/train.py --model fmnist-large --export                     # write the EMA weights to the package
    accelerate launch scripts/train.py --model fmnist-cond ...                # GPU / several processes

The learning rate warms up linearly, then decays over the phase to ``--lr-final`` times ``--lr`` (half a cosine by
default).  A phase starts at step 0, or where ``--restart-from-ema`` starts a new one from the EMA weights; a plain
resume continues the phase it finds.  Checkpoints (``--out``, default checkpoints/<model>) are safetensors plus a JSON
state, saved as a journaled set (``fastsample.training``): a kill at any moment leaves the previous checkpoint or the
new one, never a mix.  The batch at step k is drawn from a generator seeded with (seed, k), so a resumed run sees the
same data as an uninterrupted one.  A loss that is not finite or diverges stops the run (exit status 3) without
saving, so the last good checkpoint stays.  ``--commit-every-minutes`` commits the weights and EMA weights to git as
training goes.  Progress goes to a tqdm bar and to <out>/log.jsonl.  SIGTERM/SIGINT save a checkpoint and exit.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastsample import commands
from fastsample import zoo
from fastsample.data import load_fashion_mnist
from fastsample.schedules import make_betas
from fastsample.training import (LR_SCHEDULES, LossGuard, all_finite, ema_decay_at, load_state, load_tensors, lr_at,
                                 save_checkpoint)

STOPPED_BY_GUARD = 3


def save(out: Path, model, ema: dict, opt, step: int, args, losses, phase: dict):
    params = dict(model.named_parameters())
    tensors = {"model": params, "ema": ema}
    moments, adam_step = {}, None
    for name, p in params.items():
        st = opt.state.get(p, {})
        if "exp_avg" in st:
            moments[f"exp_avg.{name}"] = st["exp_avg"]
            moments[f"exp_avg_sq.{name}"] = st["exp_avg_sq"]
            adam_step = int(st["step"])
    if moments:
        tensors["optimizer"] = moments
    state = {"step": step, "model": args.model, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "ema_decay": args.ema_decay, "weighting": args.weighting, "lr_schedule": args.lr_schedule,
             "lr_final": args.lr_final, "warmup": args.warmup, "total_steps": args.steps,
             **({"distill_from": args.distill_from} if getattr(args, "distill_from", None) else {}), **phase,
             "adam_step": adam_step, "recent_loss": sum(losses) / max(1, len(losses))}
    save_checkpoint(out, tensors, state)


def load(out: Path, model, ema: dict, opt, from_ema: bool = False) -> tuple[int, dict]:
    """(step, phase: where the phase and AdamW's moments began).  ``from_ema``: a new phase, the network starting
    from the EMA weights with fresh AdamW moments (e.g. with another batch size or learning-rate schedule)."""
    state = load_state(out)
    if state is None:
        return 0, {"phase_start": 0, "warm_from": 0}
    step = int(state["step"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in load_tensors(out, "ema" if from_ema else "model").items():
            params[k].copy_(v)
        for k, v in load_tensors(out, "ema").items():
            ema[k].copy_(v)
    if from_ema:
        return step, {"phase_start": step, "warm_from": step}
    phase = {"phase_start": int(state.get("phase_start", 0)), "warm_from": int(state.get("warm_from", 0))}
    if "optimizer" in state["files"]:
        moments = load_tensors(out, "optimizer")
        adam_step = state.get("adam_step") or step - phase["warm_from"]
        for name, p in params.items():
            if f"exp_avg.{name}" in moments:
                opt.state[p] = {"step": torch.tensor(float(adam_step)),
                                "exp_avg": moments[f"exp_avg.{name}"].to(p.device),
                                "exp_avg_sq": moments[f"exp_avg_sq.{name}"].to(p.device)}
    else:  # only the weights were kept (git keeps those): AdamW restarts here, with a new warmup
        phase["warm_from"] = step
    return step, phase


def loss_weight(abar: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weight of the epsilon MSE.  "edm": EDM's weighting (sigma^2 + sd^2) / (sigma sd)^2 of the x0 error,
    which on the epsilon error is 1 + sigma^2 / sd^2 with sigma^2 = (1 - abar) / abar and sd^2 = 0.5, capped at 100.
    It makes the network predict the noise accurately at high noise, where the data prediction divides by alpha."""
    if weighting == "uniform":
        return torch.ones_like(abar)
    return (1 + (1 - abar) / abar / 0.5).clamp(max=100.0)


def export(out: Path, name: str):
    """Write the checkpoint's EMA weights as the shipped model (save_pretrained, safetensors)."""
    state = load_state(out)
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {out}")
    model = zoo.build(name)
    model.load_state_dict({**model.state_dict(), **load_tensors(out, "ema")})
    dest = zoo.MODELS_DIR / name
    model.save_pretrained(dest)
    state.pop("files", None)
    (dest / "training.json").write_text(json.dumps(state, indent=1))
    print(f"exported {name} at step {state['step']} -> {dest}")


def git_commit(out: Path, step: int, model: str) -> str | None:
    """Commit the checkpoint's weights, EMA weights, state and log; None, or git's complaint (training goes on)."""
    files = [str(out / f) for f in ("model.safetensors", "ema.safetensors", "state.json", "log.jsonl")]
    try:
        subprocess.run(["git", "add", "-f", "--", *files], check=True, capture_output=True, text=True)
        subprocess.run(["git", "commit", "-q", "--only", "-m", f"Training checkpoint: {model} at step {step}",
                        "--", *files], check=True, capture_output=True, text=True)
    except (subprocess.CalledProcessError, OSError) as e:
        return (getattr(e, "stderr", None) or str(e)).strip()
    return None


def arguments(p):
    p.add_argument("--model", required=True, choices=tuple(zoo.MODEL_CONFIGS))
    p.add_argument("--steps", type=int, default=60000, help="total optimiser steps; the phase's schedule ends here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES, help="decay over the phase")
    p.add_argument("--lr-final", type=float, default=0.05, help="last learning rate, as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weighting", default="edm", choices=("edm", "uniform"), help="per-noise-level loss weight")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--distill-from", default=None, choices=tuple(zoo.MODEL_CONFIGS),
                   help="the target is this shipped zoo model's noise prediction at the same noisy image and time "
                        "(its EMA weights, frozen) instead of the noise drawn: the student learns the teacher's map")
    p.add_argument("--label-dropout", type=float, default=0.1, help="conditional model: share of null labels")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--diverge-factor", type=float, default=10.0,
                   help="stop when 50 steps' mean loss exceeds this times the recent median")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this wall time")
    p.add_argument("--commit-every-minutes", type=float, default=None,
                   help="git-commit the weights and EMA weights after a save once this much time has passed")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (about 1.07x on 2 CPU cores)")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's package or torchvision)")
    p.add_argument("--out", default=None, help="checkpoint folder (default: checkpoints/<model>)")
    p.add_argument("--restart-from-ema", action="store_true",
                   help="a new phase: the network takes the checkpoint's EMA weights, AdamW and the schedule restart")
    p.add_argument("--export", action="store_true", help="only export the checkpoint's EMA weights to the package")


def _check(args, p) -> None:
    for name in ("steps", "batch_size", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 <= args.lr_final <= 1.0:
        p.error(f"--lr-final must be in [0, 1], got {args.lr_final}")
    if not 0.0 <= args.ema_decay < 1.0:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0.0 <= args.label_dropout <= 1.0:
        p.error(f"--label-dropout must be in [0, 1], got {args.label_dropout}")
    if args.warmup < 0 or not args.lr > 0 or not args.diverge_factor > 1:
        p.error(f"--warmup must be >= 0, --lr > 0 and --diverge-factor > 1, got {args.warmup}, {args.lr}, "
                f"{args.diverge_factor}")
    if args.distill_from is not None and (args.distill_from == args.model
                                          or zoo.MODEL_CONFIGS[args.distill_from][1] != zoo.MODEL_CONFIGS[args.model][1]):
        p.error(f"--distill-from must be another zoo model with the same class conditioning as {args.model!r}, got "
                f"{args.distill_from!r}")
    if args.data is not None:
        from fastsample.data import dataset_root

        try:
            dataset_root(args.data)
        except FileNotFoundError as e:
            p.error(str(e))


def _prepare(args, out, acc):
    """The network (channels_last, prepared by accelerate), AdamW and the EMA weights, resumed from ``out``: returns
    (model, forward, opt, ema, step, phase)."""
    torch.manual_seed(args.seed)
    model = zoo.build(args.model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in model.named_parameters()}
    step, phase = load(out, model, ema, opt, from_ema=args.restart_from_ema)
    torch.nn.Module.to(model, memory_format=torch.channels_last)  # ~2x faster CPU convolutions; torch's own .to:
    # diffusers' override warns about dtype casts, and this casts nothing
    model, opt = acc.prepare(model, opt)
    forward = torch.compile(model) if args.compile else model
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return model, forward, opt, {k: v.to(acc.device) for k, v in ema.items()}, step, phase


def _batch(args, step, acc, images, labels, abar, num_classes):
    """Step ``step``'s batch, from a generator seeded with (seed, step, process): (x_t, t, noise, abar_t, kwargs)."""
    device = acc.device
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * (acc.num_processes) + acc.process_index)
    idx = torch.randint(0, len(images), (args.batch_size,), generator=g)
    x0 = images[idx]
    t = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    a = abar[t].view(-1, 1, 1, 1)
    kw = {}
    if num_classes:
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=g).to(device) < args.label_dropout] = zoo.NULL_LABEL
        kw["class_labels"] = y
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise, a, kw


def run(args, p):
    _check(args, p)
    out = Path(args.out or f"checkpoints/{args.model}")
    if args.export:
        return export(out, args.model)
    from accelerate import Accelerator

    acc = Accelerator()
    images, labels = load_fashion_mnist("train", args.data)
    model, forward, opt, ema, step, phase = _prepare(args, out, acc)
    teacher = None
    if args.distill_from is not None:
        teacher = zoo.load(args.distill_from, device=acc.device).requires_grad_(False)
        torch.nn.Module.to(teacher, memory_format=torch.channels_last)
    if step >= args.steps:
        print(f"{out} is at step {step}, not below --steps {args.steps}: nothing to do")
        return 0
    named = list(acc.unwrap_model(model).named_parameters())
    ema_params, live = [ema[k] for k, _ in named], [v for _, v in named]
    abar = torch.cumprod(1 - make_betas(), 0).to(acc.device)  # diffusers' float32 training schedule
    images, labels = images.to(acc.device), labels.to(acc.device)
    stop = _stop_flag()
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "log.jsonl", acc.is_main_process)
    guard = LossGuard(args.diverge_factor)
    losses, pending, start, start_step, last_commit = [], [], time.time(), step, time.time()
    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_main_process, desc=args.model)
    while step < args.steps and not stop["now"]:
        loss, lr = _optimiser_step(args, step, acc, model, forward, opt, (images, labels, abar), phase, teacher)
        step += 1
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, live, 1 - ema_decay_at(step, args.ema_decay))
        pending.append(loss)
        over_time = args.max_minutes is not None and time.time() - start > 60 * args.max_minutes
        saving = step % args.save_every == 0 or step == args.steps or over_time or stop["now"]
        if len(pending) == 50 or saving:  # one device sync per 50 steps, not per step
            window, pending = torch.stack(pending).tolist(), []
            if (reason := _stop_reason(guard, window, ema_params + live if saving else None)) is not None:
                log({"step": step, "event": "stopped", "reason": reason})
                bar.close()
                print(f"stopped at step {step}: {reason}; the last good checkpoint in {out} is kept", file=sys.stderr)
                return STOPPED_BY_GUARD
            losses = (losses + window)[-200:]
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", lr=f"{lr:.2e}")
        if acc.is_main_process and saving:
            save(out, acc.unwrap_model(model), ema, opt, step, args, losses, phase)
            log({"step": step, "loss": round(sum(losses) / len(losses), 5), "lr": lr, **_speed(step - start_step, start)})
            last_commit = _maybe_commit(args, out, step, log, last_commit)
        if over_time:
            break
    bar.close()
    print(f"stopped at step {step}; checkpoint in {out}")
    return 0


def _stop_flag() -> dict:
    """A flag that SIGTERM and SIGINT set, so that the loop saves a checkpoint and exits."""
    stop = {"now": False}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.update(now=True))
    return stop


def _speed(steps: int, start: float) -> dict:
    wall = time.time() - start
    return {"steps_per_s": round(steps / wall, 3), "wall_s": round(wall, 1)}


def _optimiser_step(args, step: int, acc, model, forward, opt, data, phase: dict, teacher=None
                    ) -> tuple[torch.Tensor, float]:
    """One AdamW step on step ``step``'s batch at its learning rate: (the detached loss, the learning rate).
    ``teacher``: a frozen model whose noise prediction at the batch's noisy images is the target (distillation)."""
    images, labels, abar = data
    xt, t, noise, a, kw = _batch(args, step, acc, images, labels, abar, zoo.MODEL_CONFIGS[args.model][1])
    if teacher is not None:
        with torch.no_grad():
            noise = teacher(xt.contiguous(memory_format=torch.channels_last), t, **kw).sample
    lr = lr_at(step, lr=args.lr, total=args.steps, schedule=args.lr_schedule, final=args.lr_final,
               warmup=args.warmup, **phase)
    for group in opt.param_groups:
        group["lr"] = lr
    err = (forward(xt.contiguous(memory_format=torch.channels_last), t, **kw).sample - noise).square().mean((1, 2, 3))
    loss = (loss_weight(a.view(-1), args.weighting) * err).mean()
    opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    acc.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach(), lr


def _stop_reason(guard: LossGuard, window: list[float], weights=None) -> str | None:
    """Why the run must stop before it saves: a loss that is not finite or diverges in ``window``, or (``weights``
    given: a save is due) weights that are not finite; None to go on."""
    reason = guard.check(window)
    if reason is None and weights is not None and not all_finite(weights):
        reason = "the weights are not finite"
    return reason


def _maybe_commit(args, out, step: int, log, last_commit: float) -> float:
    """git-commit the checkpoint once --commit-every-minutes have passed since the last commit; returns the time of
    the last successful commit."""
    if args.commit_every_minutes is None or time.time() - last_commit <= 60 * args.commit_every_minutes:
        return last_commit
    problem = git_commit(out, step, args.model)
    log({"step": step, "event": "committed" if problem is None else f"commit failed: {problem}"})
    return time.time() if problem is None else last_commit


class _Log:
    """The run's JSONL event log (written by the main process only)."""

    def __init__(self, path: Path, main: bool):
        self.path, self.main = path, main

    def __call__(self, entry: dict) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


def main(argv=None):
    return commands.standalone(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
