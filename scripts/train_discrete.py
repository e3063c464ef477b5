"""Train the shipped discrete-diffusion model: scikit-learn's digits (64 tokens of 17 levels) under uniform
corruption (the kernel of diffusers' DiscreteDDIMScheduler), an MLP predicting the clean tokens, with EMA weights.

    python scripts/train_discrete.py --steps 20000 --threads 1   # resumes from checkpoints/digits-uniform
    python scripts/train_discrete.py --export                    # the EMA weights -> fastsample/models/digits-uniform

A training example is a digit x0 from the training split, a keep level alpha ~ U(0, 1) and x_alpha (each token
kept with probability alpha, else a uniform value); the loss is the cross-entropy of x0 at every position.  The
batch at step k comes from a generator seeded with (seed, k), so a resumed run sees the data an uninterrupted one
would.  Checkpoints are journaled safetensors (fastsample.training): a kill loses at most the steps since the last
save.  SIGTERM/SIGINT save and exit.
"""
from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

import torch

from fastsample.discrete_models import DIGITS_MODEL, LEVELS, MODELS_DIR, DiscreteMLPDenoiser, digits_split
from fastsample.training import ema_decay_at, load_state, load_tensors, lr_at, save_checkpoint


def corrupt(x0: torch.Tensor, alpha: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    keep = torch.rand(x0.shape, generator=g) < alpha[:, None]
    return torch.where(keep, x0, torch.randint(0, LEVELS, x0.shape, generator=g))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=f"checkpoints/{DIGITS_MODEL}")
    p.add_argument("--export", action="store_true", help="write the checkpoint's EMA weights to the package")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = DiscreteMLPDenoiser()
    if args.export:
        state = load_state(out)
        if state is None:
            raise SystemExit(f"no checkpoint in {out}")
        model.load_state_dict(load_tensors(out, "ema"))
        dest = MODELS_DIR / DIGITS_MODEL
        model.save_pretrained(dest)
        state.pop("files", None)
        (dest / "training.json").write_text(json.dumps(state, indent=1))
        print(f"exported {DIGITS_MODEL} at step {state['step']} -> {dest}")
        return
    train_x, *_ = digits_split()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    params = dict(model.named_parameters())
    ema = {k: v.detach().clone() for k, v in params.items()}
    step, state = 0, load_state(out)
    if state is not None:
        step = int(state["step"])
        with torch.no_grad():
            for k, v in load_tensors(out, "model").items():
                params[k].copy_(v)
            for k, v in load_tensors(out, "ema").items():
                ema[k].copy_(v)
        print(f"resumed at step {step}")
    stop = {"now": False}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.update(now=True))
    losses, t0, log = [], time.time(), out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)

    def save():
        save_checkpoint(out, {"model": params, "ema": ema},
                        {"step": step, "model": DIGITS_MODEL, "batch_size": args.batch_size, "lr": args.lr,
                         "seed": args.seed, "ema_decay": args.ema_decay, "total_steps": args.steps,
                         "recent_loss": sum(losses) / max(1, len(losses))})
        with open(log, "a") as f:
            f.write(json.dumps({"step": step, "loss": round(sum(losses) / max(1, len(losses)), 5),
                                "wall_s": round(time.time() - t0, 1)}) + "\n")
        print(f"step {step} loss {sum(losses) / max(1, len(losses)):.4f} ({time.time() - t0:.0f} s)", flush=True)
        losses.clear()

    while step < args.steps and not stop["now"]:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x0 = train_x[torch.randint(0, len(train_x), (args.batch_size,), generator=g)]
        alpha = torch.rand(args.batch_size, generator=g)
        logits = model(corrupt(x0, alpha, g), alpha)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, LEVELS), x0.reshape(-1))
        if not torch.isfinite(loss):
            raise SystemExit(f"loss is {float(loss)} at step {step}; the last checkpoint stays")
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=args.lr, total=args.steps, warmup=args.warmup)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        d = ema_decay_at(step, args.ema_decay)
        with torch.no_grad():
            for k, v in params.items():
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        if step % args.save_every == 0:
            save()
    if losses:
        save()


if __name__ == "__main__":
    main()
