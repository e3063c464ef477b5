"""Learn time schedules for a zoo model against a many-step teacher: GITS-style dynamic programming ("dp") or
LD3-style optimisation through the solver ("gradient", optionally with per-step prediction scales).

    python scripts/learn_schedule.py --model fmnist-large --scheduler unipc --nfe 4 5 6 8 10 --out learned/fmnist-large
    python scripts/learn_schedule.py --model fmnist-large --method gradient --scales --nfe 5
    python scripts/learn_schedule.py --model fmnist-large --method gradient --scales --teleport-fraction 0.2 --nfe 6
    python scripts/learn_schedule.py --model fmnist-cond --guidance-scale 3 --nfe 5 --out learned/fmnist-cond

Writes <out>/<scheduler>-nfe<N>.json (LearnedSchedule) and a scheduler folder <out>/<scheduler>-nfe<N>/ carrying it
(``learned_timesteps``), and prints the held-out error and the time each fit took.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from fastsample import cli, commands
from fastsample.sampling import model_fn
from fastsample import make_scheduler, sample, zoo
from fastsample.sampling import reference_states
from fastsample.guidance.cfg import ClassifierFreeGuidance
from fastsample.solvers.learned_schedule import (LR_SCHEDULES, LearnedSchedule, learn_schedule, model_hash,
                                                 validation_error)


TEACHERS = Path.home() / ".cache" / "fastsample" / "teachers"


def teacher(model, noise, scheduler, args, which: str, unet, model_kwargs):
    """The teacher's end points from ``noise``: 4 UniPC-3 steps through each interval of the fine grid, cached under
    the model's weights, the grid, the latents' seed and count, and the guidance scale (so later fits reuse it)."""
    from safetensors.torch import load_file

    from fastsample.results import save_tensors_atomic

    key = (f"{args.model}{'-flow' if args.parameterization == 'flow' else ''}-{model_hash(unet)}-{args.scheduler}{args.order}-fine{args.fine_steps}-seed{args.seed}-"
           f"{which}{len(noise)}-of{args.num}-cfg{args.guidance_scale if model_kwargs else 1:g}")
    path = TEACHERS / f"{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["x"]
    with torch.no_grad():
        x = reference_states(model, noise, scheduler, 4, **model_kwargs)[-1]
    save_tensors_atomic({"x": x}, path)
    return x


def scheduler_choices() -> tuple:
    """The registered solvers whose schedules can be learned (deterministic: fastsample.registry)."""
    from fastsample.registry import solvers

    return tuple(info.name for info in solvers() if info.name != "dc")


GRADIENT_OPTIONS = ("iterations", "batch_size", "lr", "lr_schedule", "eval_every", "ball", "scales", "decouple_time",
                    "coefficients", "select_on", "teleport_fraction")
# the gradient fit's own keywords (the command sets the iterate's pick and the teleportation itself)
FIT_OPTIONS = tuple(k for k in GRADIENT_OPTIONS if k not in ("select_on", "teleport_fraction"))


def arguments(p):
    p.add_argument("--model", default="fmnist-large", choices=tuple(zoo.MODEL_CONFIGS))
    p.add_argument("--scheduler", default="unipc", choices=scheduler_choices())
    p.add_argument("--order", type=cli.integer(1, 3), default=3)
    p.add_argument("--nfe", type=cli.integer(1), nargs="+", default=[4, 5, 6, 8, 10])
    p.add_argument("--guidance-scale", type=cli.number(0.0), default=3.0, help="conditional model only")
    p.add_argument("--num", type=cli.integer(1), default=32, help="fitting latents")
    p.add_argument("--validation", type=cli.integer(1), default=64, help="held-out latents")
    p.add_argument("--fine-steps", type=cli.integer(2), default=60)
    p.add_argument("--method", default="dp", choices=("dp", "gradient"))
    p.add_argument("--iterations", type=cli.integer(1), default=200, help="gradient: Adam iterations")
    p.add_argument("--batch-size", type=cli.integer(1), default=10, help="gradient: latents per iteration")
    p.add_argument("--lr", type=cli.number(0.0, open_min=True), default=0.05, help="gradient: Adam's step size")
    p.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES,
                   help="gradient: Adam's step size held (constant) or falling to 0 over the iterations (cosine)")
    p.add_argument("--eval-every", type=cli.integer(1), default=10,
                   help="gradient: check the whole fitting set this often and keep the best iterate")
    p.add_argument("--ball", type=cli.number(0.0), default=0.0, help="gradient: LD3's start-noise relaxation radius")
    p.add_argument("--scales", action="store_true", help="gradient: also fit per-step prediction scales")
    p.add_argument("--coefficients", action="store_true",
                   help="gradient: also fit offsets of every step's solver coefficients (learned_coefficients)")
    p.add_argument("--decouple-time", action="store_true", help="gradient: fit the model's time apart from the levels")
    p.add_argument("--select-on", default="validation", choices=("validation", "fit"),
                   help="gradient: choose the best iterate on the held-out latents (default; unconditional models) "
                        "or on the fitting ones")
    p.add_argument("--teleport-fraction", type=cli.number(0.0, 1.0, open_max=True), default=None,
                   help="gradient: teleport this share of the steps with the shipped Fashion-MNIST statistics and fit "
                        "the steps left (against the converged solve over the full interval)")
    p.add_argument("--parameterization", default="epsilon", choices=zoo.PARAMETERIZATIONS,
                   help="flow: fit on the model's flow view (zoo.load(..., parameterization='flow'), FlowMatch's grid)")
    p.add_argument("--out", type=cli.output("dir"), default=None)


def _check(args, p) -> None:
    if args.method == "dp":  # the gradient method's options would be ignored silently
        given = [f"--{k.replace('_', '-')}" for k in GRADIENT_OPTIONS if getattr(args, k) != p.get_default(k)]
        if given:
            p.error(f"{', '.join(given)} apply to --method gradient only (the dp method fits the levels alone)")
    if args.teleport_fraction is not None and (args.method != "gradient" or not 0 < args.teleport_fraction < 1):
        p.error("--teleport-fraction needs --method gradient and a fraction in (0, 1)")


def _model_and_noise(args, unet):
    """The model the fit calls (CFG for a conditional model, class labels as a keyword so that mini-batches slice
    them), and the fitting and held-out noise with their keywords."""
    classes = zoo.MODEL_CONFIGS[args.model][1]
    g = torch.Generator().manual_seed(args.seed)
    train = torch.randn(args.num, 1, 32, 32, generator=g)
    held_out = torch.randn(args.validation, 1, 32, 32, generator=g)
    if classes:
        model = ClassifierFreeGuidance(unet, torch.zeros(0, dtype=torch.long), args.guidance_scale, zoo.NULL_LABEL)
        return model, train, held_out, {"class_labels": torch.arange(args.num) % classes}, \
            {"class_labels": torch.arange(args.validation) % classes}
    return model_fn(unet), train, held_out, {}, {}


def _name(args, nfe: int) -> str:
    return f"{args.scheduler}{args.order}-nfe{nfe}" + (
        "" if args.method == "dp" else "-gradient" + "-scales" * args.scales + "-time" * args.decouple_time
        + "-coefs" * args.coefficients
        + (f"-teleport{args.teleport_fraction:g}" if args.teleport_fraction is not None else ""))


def _fit_options(args) -> dict:
    """Everything of the command that decides a fit besides the NFE and the weights."""
    keys = ("scheduler", "order", "num", "validation", "fine_steps", "method", "seed", "parameterization") + (
        GRADIENT_OPTIONS if args.method == "gradient" else ())
    return {k: getattr(args, k) for k in keys} | (
        {"guidance_scale": args.guidance_scale} if zoo.MODEL_CONFIGS[args.model][1] else {})


def _finished(path: Path, unet, command: dict) -> bool:
    if not path.is_file() or not path.with_suffix("").is_dir():
        return False
    try:
        s = LearnedSchedule.load(path)
    except ValueError:
        return False
    stored = s.extra.get("command")
    if isinstance(stored, dict) and "lr" in stored and "lr_schedule" not in stored:  # fitted before the option
        stored = {**stored, "lr_schedule": "constant"}
    return s.model_hash == model_hash(unet) and stored == command


def run(args, p):
    _check(args, p)
    unet = zoo.load(args.model, parameterization=args.parameterization)
    flow = args.parameterization == "flow"
    config = zoo.FLOW_CONFIG if flow else zoo.SCHEDULER_CONFIG
    classes = zoo.MODEL_CONFIGS[args.model][1]
    model, train, held_out, train_kw, held_kw = _model_and_noise(args, unet)
    options = {k: getattr(args, k) for k in FIT_OPTIONS} | {"seed": args.seed}
    out = Path(args.out or f"learned/{args.model}{'-flow' if flow else ''}")
    out.mkdir(parents=True, exist_ok=True)
    # the held-out teacher, once for every NFE: 4 UniPC-3 steps through each interval of the fine grid, the interval
    # every learned schedule spans (its levels are fine-grid levels)
    sch = make_scheduler(args.scheduler, **config, solver_order=args.order)
    sch.set_timesteps(args.fine_steps)
    start = time.time()
    reference = teacher(model, held_out, sch, args, "held-out", unet, held_kw)
    print(f"held-out teacher ({args.validation} latents): {time.time() - start:.1f} s", flush=True)
    teacher_seconds = None
    if args.method == "gradient":  # the fitting latents' teacher, on the same fine grid, shared by every NFE's fit
        start = time.time()
        options["target"] = teacher(model, train, sch, args, "fitting", unet, train_kw)
        if args.select_on == "validation" and not classes:
            options["validation"] = (held_out, reference)
        teacher_seconds = round(time.time() - start, 1)
        print(f"fitting teacher ({args.num} latents): {teacher_seconds} s", flush=True)
    teleport = {} if args.teleport_fraction is None else {
        "teleport_stats": str(zoo.TELEPORT_STATS), "teleport_fraction": args.teleport_fraction}
    command = _fit_options(args)
    for nfe in args.nfe:
        name = _name(args, nfe)
        if _finished(out / f"{name}.json", unet, command):  # a rerun keeps the fits it finished (a kill loses one)
            print(f"{name}: kept (fitted with these options for these weights)", flush=True)
            continue
        sch = make_scheduler(args.scheduler, **config, solver_order=args.order, **teleport)
        start = time.time()
        s = learn_schedule(model, sch, train, nfe, method=args.method, fine_steps=args.fine_steps,
                           gradient_options=options if args.method == "gradient" else None, **train_kw)
        took = time.time() - start
        if teleport:  # from the closed-form jump, against the held-out teacher over the full interval
            fitted = s.scheduler(sch)
            with torch.no_grad():
                x, _ = sample(model, fitted.prepare_latents(held_out, nfe), fitted, nfe, progress=False, **held_kw)
            s.validation_error = float((x - reference).norm() / reference.norm())
        else:
            s.validation_error = validation_error(model, sch, s, held_out, reference=reference, **held_kw)
        s.model_hash = model_hash(unet)  # the fit saw a wrapper (a lambda or CFG): the weights are the unet's
        s.extra.update(model=args.model, fit_seconds=round(took, 1), teacher_seconds=teacher_seconds,
                       guidance_scale=args.guidance_scale if classes else None, command=command)
        s.save(out / f"{name}.json")
        s.scheduler(sch).save_pretrained(out / name)
        print(f"{name}: timesteps {s.timesteps}, held-out error {s.validation_error:.4f}, fit {took:.1f} s", flush=True)


def main(argv=None):
    return commands.standalone(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
