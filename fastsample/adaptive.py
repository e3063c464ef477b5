"""Adaptive step size for the multistep solvers: an embedded pair from the solver's own rules and a PI controller.

At each node the solver has the model's prediction there and the older ones.  A step of size h (in log-SNR
lambda) is taken twice from the same history: with the solver's order k and with order k - 1.  Their difference
estimates the local error of the lower one; scaled per element by max(atol, rtol * max(|x_low|, |x_prev|)) and
averaged as an RMS, it is accepted at <= 1.  A rejected step is retried with a smaller h from the same history:
it costs no model call.  So the NFE is the number of accepted steps (plus one for a final denoise to sigma = 0),
where an embedded single-step pair (DPM-Solver-12/23, k-diffusion's ``sample_dpm_adaptive``) pays 2 or 3 calls
for every attempt, rejected or not.

The next step size is h * min(5, max(0.2, 0.9 * err^(-0.7/p) * err_prev^(0.4/p))), with p = k (Gustafsson's PI
controller).  The first step has no lower-order partner (one prediction): it is taken with ``h_init``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .expint import combine
from .solver import Grid

SAFETY, GROW, SHRINK, K_I, K_P = 0.9, 5.0, 0.2, 0.7, 0.4


@dataclass
class AdaptiveInfo:
    nfe: int = 0
    accepted: int = 0
    rejected: int = 0
    sigmas: list = field(default_factory=list)  # the VE sigma of every accepted node, the first one included


def check_adaptive(options) -> dict:
    """The adaptive options (rtol, atol, h_init, max_steps) with defaults, each checked."""
    if not isinstance(options, dict):
        raise ValueError(f"adaptive must be a dict of rtol, atol, h_init, max_steps, got {options!r}")
    unknown = set(options) - {"rtol", "atol", "h_init", "max_steps"}
    if unknown:
        raise ValueError(f"adaptive takes rtol, atol, h_init and max_steps, got {sorted(unknown)}")
    o = {"rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "max_steps": 10_000, **options}
    for key, ok in (("rtol", o["rtol"] > 0), ("atol", o["atol"] >= 0), ("h_init", o["h_init"] > 0)):
        v = o[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok:
            raise ValueError(f"adaptive {key} must be a finite number {'>= 0' if key == 'atol' else '> 0'}, got {v!r}")
    if isinstance(o["max_steps"], bool) or not isinstance(o["max_steps"], int) or o["max_steps"] < 1:
        raise ValueError(f"adaptive max_steps must be a positive integer, got {o['max_steps']!r}")
    return o


def solve_adaptive(predict, x: torch.Tensor, solver, schedule, sigma_start: float, sigma_end: float,
                   rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                   max_steps: int = 10_000) -> tuple[torch.Tensor, AdaptiveInfo]:
    """Integrate from VE level ``sigma_start`` to ``sigma_end`` (> 0) on ``schedule``.  ``predict(x, grid, i)``
    returns the model's prediction in ``solver.prediction``'s form at node i of ``grid`` (a callback goes there).
    Returns (x at sigma_end, info)."""
    _check_solve(solver, schedule, sigma_start, sigma_end, rtol, atol, h_init, max_steps)
    lam_end = -math.log(sigma_end)
    lams = [-math.log(sigma_start)]
    info = AdaptiveInfo(sigmas=[sigma_start])
    state, h, err_prev = solver.init(_grid(schedule, lams)), h_init, None
    x_prev = x
    while lams[-1] < lam_end - 1e-12:
        pred = predict(x, _grid(schedule, lams), len(lams) - 1)
        info.nfe += 1
        while True:
            if info.accepted + info.rejected >= max_steps:
                raise RuntimeError(f"adaptive solve did not reach sigma {sigma_end} in {max_steps} attempts "
                                   f"(reached {math.exp(-lams[-1]):.4g}): raise rtol/atol or max_steps")
            nxt = min(lams[-1] + h, lam_end)
            grid = _grid(schedule, lams + [nxt])
            x_high, new = solver.step(grid, replace(state, cache={}), x, pred)
            err, k = _embedded_error(solver, grid, len(lams) - 1, x_high, new, x_prev, rtol, atol)
            if err is None:  # no embedded partner yet: the first step is taken as proposed
                break
            factor = SAFETY * max(err, 1e-10) ** (-K_I / k) * (max(err_prev, 1e-10) ** (K_P / k) if err_prev else 1.0)
            h_next = (nxt - lams[-1]) * min(GROW, max(SHRINK, factor))
            if err <= 1.0:
                break
            info.rejected += 1
            h = h_next
        info.accepted += 1
        x_prev, x, state = x, x_high, new
        lams.append(nxt)
        info.sigmas.append(math.exp(-nxt))
        if err is not None:
            h, err_prev = h_next, max(err, 1e-10)
    return x, info


def _check_solve(solver, schedule, sigma_start, sigma_end, rtol, atol, h_init, max_steps) -> None:
    check_adaptive({"rtol": rtol, "atol": atol, "h_init": h_init, "max_steps": max_steps})
    if solver.stochastic:
        raise ValueError(f"adaptive step size needs a deterministic solver, got {type(solver).__name__} with noise")
    probe = _grid(schedule, [-math.log(sigma_start), -math.log(sigma_start) + 1.0])
    if len(solver.calls(probe)) != probe.num_steps:
        raise ValueError(f"adaptive step size needs a multistep solver (one model call a step and an embedded lower "
                         f"order), got {type(solver).__name__}")
    if not 0 < sigma_end < sigma_start < math.inf:
        raise ValueError(f"need 0 < sigma_end < sigma_start, got {sigma_start}, {sigma_end}")


def _embedded_error(solver, grid, i, x_high, new, x_prev, rtol, atol) -> tuple[float | None, int]:
    """(the RMS of the difference from the embedded one-order-lower step, scaled by rtol |x| + atol, or None
    while the step is first order; the step's order)."""
    k = new.orders[-1]
    if k < 2:
        return None, k
    low = solver.rule(grid, i, k - 1)
    x_low = combine(low.cx, new.last_x, low.coefs, new.history)
    scale = torch.maximum(torch.abs(x_low), torch.abs(x_prev)).mul_(rtol).clamp_min_(atol)
    return float(((x_low - x_high) / scale).square().mean().sqrt()), k


def _grid(schedule, lams) -> Grid:
    return Grid.from_sigma_ve(schedule, [math.exp(-v) for v in lams])
