"""The direct sampling loop: any scheduler (ours or diffusers'), any model ``model(x, t, **kwargs)``."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


def model_output(y):
    """The tensor of a model's output: a diffusers output's ``.sample``, a tuple's first entry, or the tensor."""
    return y.sample if hasattr(y, "sample") else (y[0] if isinstance(y, tuple) else y)


def model_fn(module):
    """``module`` (a diffusers model, or anything whose output ``model_output`` reads) as a plain function
    ``f(x, t, **kwargs) -> tensor``: what the solvers, fits and sweeps call."""
    def fn(x, t, **kwargs):
        return model_output(module(x, t, **kwargs))

    fn.module = module
    return fn


def sample(model, noise: torch.Tensor, scheduler=None, num_inference_steps: int | None = 10, callback=None,
           progress: bool = True, generator=None, timesteps=None, sigmas=None, adaptive=None, **model_kwargs):
    """Integrate from ``noise`` to a sample.  Returns ``(sample, nfe)``.

    ``scheduler``: a fastsample or diffusers scheduler instance, or the name of a fastsample solver
    ("dpmsolver++", "deis", "unipc"; default "unipc").  ``callback(i, t, x)`` runs after each step and may return
    a replacement for x.  The noise is scaled by ``scheduler.init_noise_sigma``.
    ``adaptive=dict(rtol=..., atol=..., h_init=..., max_steps=...)``: choose the steps by error control instead
    (``fastsample.adaptive``; a fastsample scheduler's deterministic solver, VP models), from the trained range's
    largest level to its smallest, then denoise to 0; ``num_inference_steps`` is not used.
    """
    if scheduler is None or isinstance(scheduler, str):
        scheduler = make_scheduler(scheduler or "unipc")
    check_fitted_to(scheduler, model)
    if adaptive is not None:
        if custom_given := [k for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None]:
            raise ValueError(f"adaptive chooses the steps itself: do not pass {custom_given}")
        return _sample_adaptive(model, noise, scheduler, adaptive, callback, model_kwargs)
    custom = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
    # diffusers' schedulers take only the keywords they know (DPMSolverMultistepScheduler has no sigmas=)
    scheduler.set_timesteps(None if custom else num_inference_steps, device=noise.device, **custom)
    # FlowMatch's schedulers have neither init_noise_sigma nor scale_model_input (their identity)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda v, t: v)
    step_kw = {} if generator is None else {"generator": generator}  # diffusers' DEIS and UniPC take no generator
    nfe = 0
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, leave=False)):
        out = model_output(model(scale(x, t), t, **model_kwargs))
        nfe += 1
        x = scheduler.step(out, t, x, **step_kw).prev_sample
        if callback is not None:
            y = callback(i, t, x)
            x = x if y is None else y
    return x, nfe


def _sample_adaptive(model, noise, scheduler, adaptive: dict, callback, model_kwargs):
    from .adaptive import check_adaptive, solve_adaptive
    from .parameterization import convert
    from .scheduler import FastScheduler

    options = check_adaptive(adaptive)
    if not isinstance(scheduler, FastScheduler):
        raise ValueError(f"adaptive needs a fastsample scheduler (its solver's embedded pair), got "
                         f"{type(scheduler).__name__}")
    if scheduler.flow is not None:
        raise ValueError("adaptive stepping starts at a finite log-SNR: flow models (sigma 1) are not supported "
                         "here; use fastsample.k_diffusion.sample_dpm_adaptive with model_type='const'")
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    if "lower_order_final" in config:  # every adaptive step is a "last" step of its grid
        config["lower_order_final"] = False
    sch = type(scheduler).from_config(config)
    solver, cfg = sch.solver, sch.config
    lo, hi = sch.sigma_bounds()
    calls = {"n": 0}

    def predict(x, grid, i, want=None):
        t = sch.model_time(grid)(i)
        out = model_output(model(x, torch.tensor(t, dtype=torch.float32), **model_kwargs))
        calls["n"] += 1
        if callback is not None:
            callback(i, t, x)
        return convert(out.to(x.dtype), x, cfg.prediction_type, grid.alpha[i], grid.sigma[i], want or solver.prediction,
                       sch.threshold)

    cdt = torch.float64 if noise.dtype == torch.float64 else torch.float32
    x, info = solve_adaptive(predict, noise.to(cdt) * sch.init_noise_sigma, solver, sch.schedule, hi, lo, **options)
    if cfg.final_sigmas_type == "zero":  # the first-order step into sigma = 0: the data prediction there
        from .solver import Grid

        end = Grid.from_sigma_ve(sch.schedule, [lo, 0.0])
        x = predict(x, end, 0, "x0") * end.alpha[1]
    return x.to(noise.dtype), calls["n"]


def check_fitted_to(scheduler, model) -> None:
    """Warn when ``scheduler`` carries a learned schedule or DC ratios fitted to other weights than ``model``'s."""
    fitted_to = getattr(scheduler, "config", {}).get("fitted_model_hash")
    if fitted_to:
        from .solvers.learned_schedule import model_hash

        ours = model_hash(model)
        if ours and ours != fitted_to:
            import warnings

            warnings.warn(f"this scheduler's fitted schedule or ratios were learned for another model (weights hash "
                          f"{fitted_to}, this model's is {ours}): refit it for these weights", stacklevel=3)


def make_scheduler(name: str, **config):
    """A registered scheduler by name (``fastsample.registry``: a solver such as "unipc", an alias such as "dpm",
    or a variant such as "unipc3"), with ``config`` over the variant's options."""
    from .registry import make_scheduler as registered

    return registered(name, **config)


def invert(model, x0: torch.Tensor, scheduler, num_inference_steps: int, **model_kwargs):
    """The latents that regenerate ``x0`` exactly with ``scheduler`` (a ``BDIAScheduler``): see
    ``fastsample.solvers.bdia.invert``; regenerate with ``scheduler.load_inversion(inversion)`` and a run from
    ``inversion.latents``."""
    from .solvers.bdia import invert as bdia_invert

    return bdia_invert(model, x0, scheduler, num_inference_steps, **model_kwargs)


def integrate(model, x: torch.Tensor, solver, grid, prediction_type: str = "epsilon", model_time=None,
              generator=None, threshold=None):
    """The scheduler-free loop over a ``Solver`` and a ``Grid``: returns the sample at the grid's last level.
    ``model_time(i)`` gives the model's time input at node i (default: the grid's native time)."""
    return trajectory(model, x, solver, grid, prediction_type, model_time, generator, threshold,
                      keep=[grid.num_steps])[0]


def trajectory(model, x: torch.Tensor, solver, grid, prediction_type: str = "epsilon", model_time=None,
               generator=None, threshold=None, keep=None, transforms=(), scales=None, **model_kwargs) -> list:
    """As ``integrate``, returning the samples at the grid nodes listed in ``keep`` (every node if None; node 0 is
    ``x`` itself).  ``transforms``: the run's prediction transforms (``fastsample.transforms``, e.g. a scheduler's
    ``prediction_transforms(n)``); ``scales``: per-step scales of the solver's prediction (a learned schedule's).
    ``model_kwargs`` (class labels, ...) go to every model call.  The loop is ``fastsample.driver.drive``."""
    from .driver import drive

    keep = set(range(grid.num_steps + 1) if keep is None else keep)
    out = [x] if 0 in keep else []

    def call(x, node):
        return model_output(model(x, grid.t[node] if model_time is None else model_time(node), **model_kwargs))

    def noise(step):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    def collect(step, x, state):
        if step + 1 in keep:
            out.append(x)
        return x, state

    drive(solver, grid, x, call, prediction_type, transforms, scales, threshold, noise, after_step=collect)
    return out


def refine(grid, schedule, per_step: int):
    """A grid with ``per_step`` steps in every interval of ``grid``, uniform in native time, that passes through every
    node of ``grid`` exactly (so a fine solve can be read off at the coarse levels).  Returns (fine grid, the fine
    indices of the coarse nodes)."""
    from .schedules import F64
    from .solver import Grid

    if per_step < 1:
        raise ValueError(f"per_step must be >= 1, got {per_step}")
    cols = {"alpha": [], "sigma": [], "lam": [], "t": []}
    nodes = []
    for j in range(grid.num_steps):
        nodes.append(len(cols["t"]))
        for key in cols:
            cols[key].append(getattr(grid, key)[j])
        inner = torch.linspace(grid.t[j], grid.t[j + 1], per_step + 1, dtype=F64)[1:-1]
        if len(inner):
            a, s = schedule.alpha_sigma(inner)
            lam = torch.log(a) - torch.log(s)
            # only levels strictly between the ends (near t_min a schedule can be flat in t, and sigma_min -> 0
            # is a single step) and strictly increasing in lambda
            lo, keep = grid.lam[j], []
            for k, v in enumerate(lam.tolist()):
                if lo < v < grid.lam[j + 1]:
                    keep.append(k)
                    lo = v
            cols["alpha"] += a[keep].tolist()
            cols["sigma"] += s[keep].tolist()
            cols["lam"] += lam[keep].tolist()
            cols["t"] += inner[keep].tolist()
    nodes.append(len(cols["t"]))
    for key in cols:
        cols[key].append(getattr(grid, key)[-1])
    return Grid(tuple(cols["alpha"]), tuple(cols["sigma"]), tuple(cols["lam"]), tuple(cols["t"])), nodes


def reference_states(model, noise: torch.Tensor, scheduler, per_step: int = 20, **model_kwargs) -> list:
    """The teacher: a many-step UniPC-3 solve from ``noise`` through the levels of ``scheduler``'s current grid
    (``set_timesteps`` first), ``per_step`` steps per interval; returns the sample at each of the grid's nodes."""
    from .solvers import UniPC

    grid = scheduler.grid
    if grid is None:
        raise RuntimeError("call scheduler.set_timesteps(...) before reference_states")
    fine, nodes = refine(grid, scheduler.schedule, per_step)
    x = noise * scheduler.init_noise_sigma
    return trajectory(model, x, UniPC(3), fine, scheduler.config.prediction_type, scheduler.model_time(fine),
                      keep=nodes, **model_kwargs)
