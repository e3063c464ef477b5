"""Sample an image grid with a fastsample scheduler and write a PNG.

    python scripts/sample.py                       # defaults: UniPC, 10 model calls, 16 images
    python scripts/sample.py --scheduler dpmsolver++ --nfe 8 --num 25 --seed 1 --out grid.png
    python scripts/sample.py --nfe 10 200 --out results/fmnist-large/nfe10-vs-200.png   # the same noise, side by side

Models: the shipped Fashion-MNIST UNets (fastsample.zoo: fmnist-small, fmnist-large, fmnist-cond) and the
exact-score ``shapes`` testbed (fastsample.testbeds.shapes_mixture), a Gaussian mixture of 32x32 shapes whose score
is known in closed form.  The default is fmnist-large once it is shipped, the shapes testbed until then.
``--guidance-scale`` applies classifier-free guidance to fmnist-cond (one row per class).
"""
from __future__ import annotations

import os
import time

import torch

from fastsample import cli, commands
from fastsample.sampling import model_fn
from fastsample import make_scheduler, sample, zoo
from fastsample.data import image_grid
from fastsample.guidance.cfg import ClassifierFreeGuidance
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.testbeds import shapes_mixture

MODELS = ("shapes",) + tuple(zoo.MODEL_CONFIGS)


class ImageModel:
    """Adapts the flat testbed to image tensors [B, 1, H, W] with diffusers' call convention."""

    def __init__(self, testbed, size):
        self.testbed, self.size = testbed, size

    def __call__(self, x, t):
        return self.testbed(x.reshape(x.shape[0], -1), t).reshape(x.shape)


def make_model(name, num, size, guidance_scale):
    if name == "shapes":
        return ImageModel(shapes_mixture(size, schedule=DiscreteVP(make_betas())), size)
    unet = zoo.load(name)
    if zoo.MODEL_CONFIGS[name][1]:
        labels = torch.arange(num) % zoo.MODEL_CONFIGS[name][1]
        return ClassifierFreeGuidance(unet, labels, guidance_scale, zoo.NULL_LABEL)
    return model_fn(unet)


def scheduler_choices() -> tuple:
    """Every registered scheduler name (fastsample.registry): solvers, aliases and variants."""
    from fastsample.registry import all_names

    return tuple(all_names())


def arguments(p):
    p.add_argument("--model", default="fmnist-large" if "fmnist-large" in zoo.available() else "shapes",
                   choices=MODELS)
    p.add_argument("--guidance-scale", type=cli.number(0.0), default=3.0, help="classifier-free guidance (fmnist-cond)")
    p.add_argument("--scheduler", default="unipc", choices=scheduler_choices())
    p.add_argument("--order", type=cli.integer(1, 3), default=None, help="solver_order (default: the scheduler's)")
    p.add_argument("--nfe", type=cli.integer(1), nargs="+", default=[10],
                   help="model calls (= inference steps); several: one grid each from the same noise, side by side")
    p.add_argument("--num", type=cli.integer(1), default=16, help="number of images")
    p.add_argument("--size", type=cli.integer(8), default=32, help="image size (the shapes model; the Fashion-MNIST models are 32)")
    p.add_argument("--out", type=cli.output("file", (".png", ".jpg", ".jpeg", ".webp")), default="outputs/sample.png")


def run(args, p):
    if args.model != "shapes" and args.size != 32:
        p.error("the Fashion-MNIST models are 32x32: --size must be 32")
    model = make_model(args.model, args.num, args.size, args.guidance_scale)
    config = {} if args.order is None else {"solver_order": args.order}
    scheduler = make_scheduler(args.scheduler, **config)
    noise = torch.randn(args.num, 1, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    grids = []
    for steps in args.nfe:
        start = time.perf_counter()
        with torch.no_grad():
            x, nfe = sample(model, noise, scheduler=scheduler, num_inference_steps=steps, progress=False)
        took = time.perf_counter() - start
        grids.append(image_grid(x))
        print(f"{args.num} samples from {args.model} with {type(scheduler).__name__} at {nfe} model calls "
              f"in {took:.2f} s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    side_by_side(grids).save(args.out)
    print(f"-> {args.out}")


def side_by_side(grids, gap: int = 16):
    """PIL grids in a row with a white gap between them."""
    from PIL import Image

    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("L", (width, max(g.height for g in grids)), 255)
    x = 0
    for g in grids:
        canvas.paste(g, (x, 0))
        x += g.width + gap
    return canvas


def main(argv=None):
    return commands.standalone(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
