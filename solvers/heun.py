"""Heun's method on the probability-flow ODE in the VE variables (EDM's second-order sampler; diffusers'
``HeunDiscreteScheduler`` and k-diffusion's ``sample_heun`` without churn).  A staged solver (BDIA-Heun is the
other): two model calls a step, the second at the step's end node, and one (Euler, i.e. DDIM) into sigma = 0 and from pure noise (flow
sigma 1, where the step is infinite in the VE variables).

With x_bar = x / alpha, rho = sigma / alpha and Delta = rho' - rho, the first stage is the Euler step
x_bar' = x_bar + Delta (x_bar - D) / rho, which in x is DDIM's x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) D.
The trapezoidal second stage, written from the first stage's result, is x_bar_next = x_bar' + Delta (D - D') / (2 rho'),
with D' the data prediction at (x', rho'): in x, x_next = x' + alpha' Delta / (2 rho') (D - D').
"""
from __future__ import annotations

from dataclasses import replace

from fastsample.expint import combine
from fastsample.solver import Grid, Rule, Solver
from fastsample.transforms import apply


class Heun(Solver):
    name = "heun"
    prediction = "x0"

    def __init__(self, order: int = 2):
        if order != 2:
            raise ValueError(f"solver_order must be 2 for Heun's method, got {order!r}")
        super().__init__(order)

    def calls(self, grid: Grid) -> list[tuple[int, int]]:
        out = []
        for i in range(grid.num_steps):
            out.append((i, i))
            if self._two_stages(grid, i):
                out.append((i + 1, i))
        return out

    @staticmethod
    def _two_stages(grid: Grid, i: int) -> bool:
        """Into sigma = 0 the Euler step is exact for the data prediction there; from pure noise (alpha = 0, flow
        sigma 1) the step is infinite in the VE variables and DDIM's first-order step is the exact one."""
        return grid.sigma[i + 1] > 0 and grid.alpha[i] > 0

    def rule(self, grid: Grid, i: int, k: int) -> Rule:  # the first stage: DDIM (Euler in the VE variables)
        a_s, s_s, a_t, s_t = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
        return Rule(s_t / s_s, (a_t - a_s * s_t / s_s,))

    def second_stage(self, grid: Grid, i: int) -> Rule:  # on (D', D) from x'
        a_s, s_s, a_t, s_t = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
        rho_s, rho_t = s_s / a_s, s_t / a_t
        c = a_t * (rho_t - rho_s) / (2 * rho_t)
        return Rule(1.0, (-c, c))

    def step(self, grid: Grid, state, x, pred, noise=None):
        i = state.index
        if i >= grid.num_steps:
            raise RuntimeError(f"step {i} is past the end of the {grid.num_steps}-step grid: call set_timesteps again")
        first = state.last_x is None  # the first stage, at node i, or the second, at node i + 1
        (pred,), memos = apply("prediction", state.transforms, state.memos, grid, i if first else i + 1, x, (pred,))
        if first:
            rule = self._cached(state, ("p", i), lambda: self.rule(grid, i, 1))
            x_next = combine(rule.cx, x, rule.coefs, (pred,))
            if not self._two_stages(grid, i):  # into clean data, or from pure noise: the Euler step is the step
                return x_next, replace(state, index=i + 1, history=(), orders=(1,), last_x=None, memos=memos)
            return x_next, replace(state, history=(pred,), last_x=x, memos=memos)
        rule = self._cached(state, ("c", i), lambda: self.second_stage(grid, i))
        x_next = combine(rule.cx, x, rule.coefs, (pred,) + state.history)
        return x_next, replace(state, index=i + 1, history=(), orders=(2,), last_x=None, memos=memos)


# ---------------------------------------------------------------------------- diffusers scheduler
from diffusers.configuration_utils import register_to_config  # noqa: E402

from fastsample.scheduler import FastScheduler, SchedulerMixin, shared_config  # noqa: E402,F401  (SchedulerMixin: pipeline reload)


class HeunScheduler(FastScheduler):
    """Drop-in for diffusers' ``HeunDiscreteScheduler``: ``timesteps`` lists 2N - 1 model calls for N steps (each
    inner level twice, as diffusers does), and ``order`` is 2 for the pipelines' progress bars.  It works in the VP
    variables like the other fastsample schedulers (``init_noise_sigma`` 1), on any of their grids."""

    order = 2

    @register_to_config
    @shared_config(beta_start=0.00085, beta_end=0.012)
    def __init__(self, solver_order: int = 2, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        self._setup()

    def make_solver(self) -> Solver:
        return Heun(self.config.solver_order)


from fastsample.registry import Variant, register  # noqa: E402

# the equality with HeunDiscreteScheduler needs trailing or custom grids and VP-scaled start noise
# (tests/test_equality.py), which a pipeline's defaults are not
register("heun", HeunScheduler, diffusers_peer="HeunDiscreteScheduler", peer_in_pipelines=False,
         variants=[Variant("heun2", {"solver_order": 2}, 2)])
