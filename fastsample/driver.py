"""The one sampling loop. Every path that runs a ``Solver`` on a ``Grid`` (the diffusers adapter's ``step``,
``sampling.trajectory``, ``fastsample.k_diffusion``, FKC, DC-Solver's fit) takes a model call's output through
:func:`call_step`: convert it once to the solver's prediction, apply the per-step scales, take the exact first-order
step from pure noise where a noise-prediction solver meets alpha = 0, draw the step's noise only when the solver
needs it, and step. :func:`drive` is the loop over a solve's model calls (``Solver.calls``: one a step, or a staged
solver's several) with hooks: the model call, a callback after each call, and a hook after each finished step that
may replace the sample and the state (FKC's resampling). Two loops stay outside it on purpose: the learned-schedule
fit's ``_Program`` differentiates the solve with respect to the grid, so its coefficients are autograd tensors where
a ``Rule`` holds floats, and the teleport choice calls the model once per node without stepping."""
from __future__ import annotations

from .parameterization import convert
from .solver import step_from_pure_noise


def call_step(solver, grid, state, x, out, prediction_type: str, node: int, step: int, scales=None, threshold=None,
              noise=None):
    """One model call's update: ``out`` is the model's output at grid node ``node`` (in ``prediction_type``), for
    step ``step``; ``scales[step]`` multiplies the solver's prediction; ``noise(step)`` supplies the step's noise
    when ``solver.needs_noise`` says so.  Returns (x after the call, new state)."""
    if grid.alpha[node] == 0.0 and solver.prediction == "eps":
        # the noise is x / sigma exactly there and carries nothing of the model: the exact first-order step through
        # the model's data prediction (the next steps use no history from this node)
        x0 = convert(out, x, prediction_type, 0.0, grid.sigma[node], "x0", threshold)
        return step_from_pure_noise(grid, state, x, x0 if scales is None else x0 * scales[step])
    pred = convert(out, x, prediction_type, grid.alpha[node], grid.sigma[node], solver.prediction, threshold)
    if scales is not None:
        pred = pred * scales[step]
    z = noise(step) if noise is not None and solver.needs_noise(grid, step) else None
    return solver.step(grid, state, x, pred, z)


def drive(solver, grid, x, model_output, prediction_type: str, transforms=(), scales=None, threshold=None,
          noise=None, callback=None, after_step=None, dtype=None, progress=None):
    """Run ``solver`` over ``grid`` from ``x``: ``model_output(x, node)`` is the model's output at grid node ``node``;
    ``callback(node, step, x, out, state)`` runs after each model call, before its update (DC-Solver's fit tunes the
    step's ratio there); ``after_step(step, x, state)`` runs after each finished step and returns (x, state),
    possibly replaced; ``dtype``: compute in it and keep ``x``'s own dtype between calls; ``progress(calls)`` wraps
    the list of model calls (a progress bar). Returns (the sample at the grid's last level, the final state)."""
    state = solver.init(grid, transforms)
    calls = solver.calls(grid)
    for node, step in progress(calls) if progress is not None else calls:
        out = model_output(x, node)
        if callback is not None:
            callback(node, step, x, out, state)
        xc = x if dtype is None else x.to(dtype)
        x_next, state = call_step(solver, grid, state, xc, out if dtype is None else out.to(dtype), prediction_type,
                                  node, step, scales, threshold, noise)
        x = x_next if dtype is None else x_next.to(x.dtype)
        if after_step is not None and state.index == step + 1:
            x, state = after_step(step, x, state)
    return x, state
