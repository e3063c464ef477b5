"""The direct sampling loop: any scheduler (ours or diffusers'), any model ``model(x, t, **kwargs)``."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


def _output(y):
    return y.sample if hasattr(y, "sample") else (y[0] if isinstance(y, tuple) else y)


def sample(model, noise: torch.Tensor, scheduler=None, num_inference_steps: int | None = 10, callback=None,
           progress: bool = True, generator=None, timesteps=None, sigmas=None, **model_kwargs):
    """Integrate from ``noise`` to a sample.  Returns ``(sample, nfe)``.

    ``scheduler``: a fastsample or diffusers scheduler instance, or the name of a fastsample solver
    ("dpmsolver++", "deis", "unipc"; default "unipc").  ``callback(i, t, x)`` runs after each step and may return
    a replacement for x.  The noise is scaled by ``scheduler.init_noise_sigma``.
    """
    if scheduler is None or isinstance(scheduler, str):
        scheduler = make_scheduler(scheduler or "unipc")
    custom = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
    # diffusers' schedulers take only the keywords they know (DPMSolverMultistepScheduler has no sigmas=)
    scheduler.set_timesteps(None if custom else num_inference_steps, device=noise.device, **custom)
    x = noise * scheduler.init_noise_sigma
    step_kw = {} if generator is None else {"generator": generator}  # diffusers' DEIS and UniPC take no generator
    nfe = 0
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, leave=False)):
        out = _output(model(scheduler.scale_model_input(x, t), t, **model_kwargs))
        nfe += 1
        x = scheduler.step(out, t, x, **step_kw).prev_sample
        if callback is not None:
            y = callback(i, t, x)
            x = x if y is None else y
    return x, nfe


def make_scheduler(name: str, **config):
    from fastsample.solvers import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler

    table = {"dpmsolver++": DPMSolverPlusPlusScheduler, "dpm": DPMSolverPlusPlusScheduler, "deis": DEISScheduler,
             "unipc": UniPCScheduler}
    if name not in table:
        raise ValueError(f"scheduler name must be one of {tuple(table)}, got {name!r}")
    return table[name](**config)


def integrate(model, x: torch.Tensor, solver, grid, prediction_type: str = "epsilon", model_time=None,
              generator=None, threshold=None):
    """The scheduler-free loop over a ``Solver`` and a ``Grid``: returns the sample at the grid's last level.
    ``model_time(i)`` gives the model's time input at node i (default: the grid's native time)."""
    from .parameterization import convert

    state = solver.init(grid)
    for i in range(grid.num_steps):
        t = grid.t[i] if model_time is None else model_time(i)
        pred = convert(_output(model(x, t)), x, prediction_type, grid.alpha[i], grid.sigma[i], solver.prediction,
                       threshold)
        noise = None
        if solver.needs_noise(grid, i):
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x, state = solver.step(grid, state, x, pred, noise)
    return x
