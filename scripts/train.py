"""Train a Fashion-MNIST UNet2DModel (VP, diffusers' linear betas, 1000 steps, epsilon prediction) with EMA weights.

    python scripts/train.py --model fmnist-large --steps 60000            # resumes from checkpoints/fmnist-large
    python scripts/train.py --model fmnist-large --export                  # write the EMA weights to the package
    accelerate launch scripts/train.py --model fmnist-cond ...             # GPU / several processes

Checkpoints (``--out``, default checkpoints/<model>) are safetensors plus a JSON state: the weights, the EMA weights
and the AdamW moments.  The batch at step k is drawn from a generator seeded with (seed, k), so a resumed run sees
the same data as an uninterrupted one.  Progress goes to a tqdm bar and to <out>/log.jsonl.  SIGTERM/SIGINT save a
checkpoint before exiting.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fastsample import zoo
from fastsample.data import load_fashion_mnist
from fastsample.schedules import make_betas


def save_checkpoint(out: Path, model, ema: dict, opt, step: int, args, losses):
    out.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(out / "model.safetensors"))
    save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(out / "ema.safetensors"))
    moments = {}
    for name, p in params.items():
        st = opt.state.get(p, {})
        if "exp_avg" in st:
            moments[f"exp_avg.{name}"] = st["exp_avg"].contiguous().cpu()
            moments[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].contiguous().cpu()
    if moments:
        save_file(moments, str(out / "optimizer.safetensors"))
    state = {"step": step, "model": args.model, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "ema_decay": args.ema_decay, "weighting": args.weighting, "recent_loss": sum(losses) / max(1, len(losses))}
    (out / "state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint(out: Path, model, ema: dict, opt, from_ema: bool = False) -> tuple[int, bool]:
    """(step, whether the AdamW moments were restored).  ``from_ema``: the network starts from the EMA weights too,
    with fresh AdamW moments (a new training phase, e.g. with another batch size)."""
    if not (out / "state.json").is_file():
        return 0, True
    state = json.loads((out / "state.json").read_text())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in load_file(str(out / f"{'ema' if from_ema else 'model'}.safetensors")).items():
            params[k].copy_(v)
        for k, v in load_file(str(out / "ema.safetensors")).items():
            ema[k].copy_(v)
    has_moments = (out / "optimizer.safetensors").is_file() and not from_ema
    if has_moments:  # absent when only the weights were kept (git keeps those): AdamW restarts, with a new warmup
        moments = load_file(str(out / "optimizer.safetensors"))
        for name, p in params.items():
            if f"exp_avg.{name}" in moments:
                opt.state[p] = {"step": torch.tensor(float(state["step"])),
                                "exp_avg": moments[f"exp_avg.{name}"].to(p.device),
                                "exp_avg_sq": moments[f"exp_avg_sq.{name}"].to(p.device)}
    return int(state["step"]), has_moments


def loss_weight(abar: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weight of the epsilon MSE.  "edm": EDM's weighting (sigma^2 + sd^2) / (sigma sd)^2 of the x0 error,
    which on the epsilon error is 1 + sigma^2 / sd^2 with sigma^2 = (1 - abar) / abar and sd^2 = 0.5, capped at 100.
    It makes the network predict the noise accurately at high noise, where the data prediction divides by alpha."""
    if weighting == "uniform":
        return torch.ones_like(abar)
    return (1 + (1 - abar) / abar / 0.5).clamp(max=100.0)


def export(out: Path, name: str):
    """Write the checkpoint's EMA weights as the shipped model (save_pretrained, safetensors)."""
    model = zoo.build(name)
    model.load_state_dict({**model.state_dict(), **load_file(str(out / "ema.safetensors"))})
    dest = zoo.MODELS_DIR / name
    model.save_pretrained(dest)
    state = json.loads((out / "state.json").read_text())
    (dest / "training.json").write_text(json.dumps(state, indent=1))
    print(f"exported {name} at step {state['step']} -> {dest}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=tuple(zoo.MODEL_CONFIGS))
    p.add_argument("--steps", type=int, default=60000, help="total optimiser steps (a resumed run continues to this)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weighting", default="edm", choices=("edm", "uniform"), help="per-noise-level loss weight")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1, help="conditional model: share of null labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this wall time")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's package or torchvision)")
    p.add_argument("--out", default=None, help="checkpoint folder (default: checkpoints/<model>)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--restart-from-ema", action="store_true",
                   help="resume with the network set to the checkpoint's EMA weights and a fresh AdamW (new phase)")
    p.add_argument("--export", action="store_true", help="only export the checkpoint's EMA weights to the package")
    args = p.parse_args(argv)
    out = Path(args.out or f"checkpoints/{args.model}")
    if args.export:
        return export(out, args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    acc = Accelerator()
    images, labels = load_fashion_mnist("train", args.data)
    num_classes = zoo.MODEL_CONFIGS[args.model][1]
    torch.manual_seed(args.seed)
    model = zoo.build(args.model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in model.named_parameters()}
    step, has_moments = load_checkpoint(out, model, ema, opt, from_ema=args.restart_from_ema)
    warm_from = 0 if has_moments else step
    torch.nn.Module.to(model, memory_format=torch.channels_last)  # ~2x faster CPU convolutions; torch's own .to:
    # diffusers' override warns about dtype casts, and this casts nothing
    model, opt = acc.prepare(model, opt)
    device = acc.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ema = {k: v.to(device) for k, v in ema.items()}
    named = list(acc.unwrap_model(model).named_parameters())
    ema_params, live = [ema[k] for k, _ in named], [v for _, v in named]
    abar = torch.cumprod(1 - make_betas(), 0).to(device)  # diffusers' float32 training schedule
    images, labels = images.to(device), labels.to(device)
    stop = {"now": False}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.update(now=True))
    log = (out / "log.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    losses, pending, start, start_step = [], [], time.time(), step
    bar = tqdm(total=args.steps, initial=step, disable=not acc.is_main_process, desc=args.model)
    while step < args.steps and not stop["now"]:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * (acc.num_processes) + acc.process_index)
        idx = torch.randint(0, len(images), (args.batch_size,), generator=g)
        x0 = images[idx]
        t = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        kw = {}
        if num_classes:
            y = labels[idx].clone()
            y[torch.rand(len(y), generator=g).to(device) < args.label_dropout] = zoo.NULL_LABEL
            kw["class_labels"] = y
        lr = args.lr * min(1.0, (step + 1 - warm_from) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        err = (model(xt.contiguous(memory_format=torch.channels_last), t, **kw).sample - noise).square().mean((1, 2, 3))
        loss = (loss_weight(a.view(-1), args.weighting) * err).mean()
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, live, 1 - decay)
        pending.append(loss.detach())
        over_time = args.max_minutes is not None and time.time() - start > 60 * args.max_minutes
        saving = step % args.save_every == 0 or step == args.steps or over_time
        if len(pending) == 50 or saving or stop["now"]:  # one device sync per 50 steps, not per step
            losses = (losses + torch.stack(pending).tolist())[-200:]
            pending = []
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
        if acc.is_main_process and saving:
            save_checkpoint(out, acc.unwrap_model(model), ema, opt, step, args, losses)
            rate = (step - start_step) / (time.time() - start)
            with log.open("a") as f:
                f.write(json.dumps({"step": step, "loss": round(sum(losses) / len(losses), 5), "lr": lr,
                                    "steps_per_s": round(rate, 3), "wall_s": round(time.time() - start, 1)}) + "\n")
        if over_time:
            break
    if acc.is_main_process:
        save_checkpoint(out, acc.unwrap_model(model), ema, opt, step, args, losses)
    bar.close()
    print(f"stopped at step {step}; checkpoint in {out}")


if __name__ == "__main__":
    sys.exit(main())
