"""Convergence order on an exact-score Gaussian mixture: error against the exact ODE solution at 2^k steps,
logSNR-uniform grids, VP, VE and flow schedules; the fitted log-log slope must be within 0.3 of the order."""
import math

import numpy as np
import pytest
import torch

from fastsample.sampling import integrate

from fastsample.schedules import VE, ContinuousVP, RectifiedFlow
from fastsample.solver import Grid
from fastsample.testbeds import GaussianMixture

SCHEDULES = {"vp": (ContinuousVP("linear"), 1.0, 1e-3), "ve": (VE(0.002, 80.0), 80.0, 0.002),
             "flow": (RectifiedFlow(), 0.999, 1e-3)}
NS = [32, 64, 128, 256]
NS_HIGH = [16, 32, 64, 128]  # a fourth-order method leaves its asymptotic range sooner


def solvers(schedule):
    """Every deterministic variant in the registry, with the order it declares; lower_order_final off: the last steps
    are ordinary steps here.  A registered solver is tested here without any edit of this file."""
    from fastsample.registry import solver_on, variants

    def options(info):
        return {"lower_order_final": False} if info.takes("lower_order_final") else {}

    return {name: (solver_on(schedule, name, **options(info)), v.order)
            for name, (info, v) in variants().items() if v.order is not None}


@pytest.fixture(scope="module", params=list(SCHEDULES))
def problem(request):
    schedule, t0, t1 = SCHEDULES[request.param]
    gm = GaussianMixture.random(dim=4, components=3, seed=1, schedule=schedule)
    (a0, s0), (a1, s1) = [tuple(float(v) for v in schedule.alpha_sigma(torch.tensor(t))) for t in (t0, t1)]
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(4 * a0 ** 2 + s0 ** 2)
    exact = gm.exact_solution(x_T, s0 / a0, s1 / a1, a0, a1)
    lam0, lam1 = float(schedule.lam(torch.tensor(t0))), float(schedule.lam(torch.tensor(t1)))
    return request.param, schedule, gm, x_T, exact, lam0, lam1


def _levels(schedule, lam):
    a, s = schedule.alpha_sigma(schedule.t_from_lambda(torch.tensor(lam, dtype=torch.float64)))
    return float(a), float(s)


def test_exact_solution_is_converged(problem):
    _, schedule, gm, x_T, exact, lam0, lam1 = problem
    (a0, s0), (a1, s1) = _levels(schedule, lam0), _levels(schedule, lam1)
    tighter = gm.exact_solution(x_T, s0 / a0, s1 / a1, a0, a1, rtol=1e-13)
    assert float((tighter - exact).norm() / exact.norm()) < 1e-10


def measured_order(problem, label, solver, order) -> float:
    """The convergence slope of ``solver`` on ``problem`` (asserted within 0.3 of ``order``)."""
    name, schedule, gm, x_T, exact, lam0, lam1 = problem
    errs, ns = [], NS_HIGH if order >= 4 else NS
    for n in ns:
        grid = Grid.from_times(schedule, schedule.t_from_lambda(torch.linspace(lam0, lam1, n + 1, dtype=torch.float64)))
        x = integrate(gm, x_T.clone(), solver, grid, "epsilon")
        errs.append(float((x - exact).norm() / exact.norm()))
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    # the reference 3M weights, and BDIA's leapfrog (gamma 1) after its DDIM first step: they approach their order
    # from above, so judge the finest interval
    if label in ("dpm++3m", "bdia1"):
        slope = math.log2(errs[-2] / errs[-1])
    assert abs(slope - order) < 0.3, (name, label, order, slope, errs)
    return slope


def test_convergence_orders(problem):
    report = {label: (order, round(measured_order(problem, label, solver, order), 2))
              for label, (solver, order) in solvers(problem[1]).items()}
    print(problem[0], "(declared, measured)", report)


def test_flow_match_grid_from_pure_noise_converges():
    """From sigma = 1 exactly (alpha = 0, lambda = -inf), where FlowMatch grids start, through the schedulers
    themselves: every solver stays finite and converges to a 2048-step solve.  The first step is an infinite step in
    lambda, taken at first order, so the rate is at most about 2 whatever the solver's order."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastsample.solvers import UniPCScheduler

    gm = GaussianMixture.random(dim=4, components=3, seed=1, schedule=RectifiedFlow(t_min=0.0),
                                prediction_type="flow_prediction", time_scale=10000.0)
    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=10000).config
    x1 = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def solve(cls, n, **kw):
        s = cls.from_config(cfg, **kw)
        s.set_timesteps(n)
        x = x1.clone()
        for t in s.timesteps:
            x = s.step(gm(x, t), t, x).prev_sample
        return x

    ref = solve(UniPCScheduler, 2048, solver_order=3)
    from fastsample.registry import variants

    for name, (info, v) in variants().items():  # every registered deterministic variant
        if v.order is None:
            continue
        errs = [float((solve(info.scheduler, n, **v.options) - ref).norm() / ref.norm()) for n in (32, 64, 128)]
        assert all(math.isfinite(e) for e in errs) and errs[0] > errs[1] > errs[2], (name, errs)
        # at least first order (about 2 for most: unipc1 1.64, dpm++2m 1.97 at the finest); BDIA at gamma 0.5, first
        # order, approaches 1 from below (0.85 then 0.92)
        slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
        assert slopes[-1] > 0.9 and min(slopes) > 0.8, (name, errs)
