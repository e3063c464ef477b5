"""Train the Fashion-MNIST feature network used for FID (fastsample.metrics.FeatureNet) and ship it.

    python scripts/train_classifier.py [--epochs 5] [--threads 1]

Writes fastsample/models/fmnist-features/{model.safetensors, config.json}; the config records the test accuracy.
"""
from __future__ import annotations

import argparse
import time

import torch

from fastsample import cli
from fastsample.data import load_fashion_mnist
from fastsample.metrics import FEATURES_DIR, FeatureNet, extract


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=cli.integer(1), default=5)
    p.add_argument("--batch-size", type=cli.integer(1), default=128)
    p.add_argument("--lr", type=cli.number(0.0, open_min=True), default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=cli.integer(1), default=None)
    p.add_argument("--out", type=cli.output("dir"), default=str(FEATURES_DIR))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    net = FeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // args.batch_size):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb = x[idx]
            shift = torch.randint(-2, 3, (2,), generator=g)
            xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))  # small translations
            loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        acc = float((extract(net, xt, logits=True).argmax(1) == yt).double().mean())
        print(f"epoch {epoch + 1}: loss {float(loss):.4f}, test accuracy {acc:.4f}, {time.time() - start:.0f} s", flush=True)
    net.save(args.out, {"test_accuracy": round(acc, 4), "epochs": args.epochs, "seed": args.seed,
                        "train_seconds": round(time.time() - start)})
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
