"""DEIS multistep (arXiv 2204.13902): exponential integrator of the noise prediction with Lagrange extrapolation.

    x_t = (alpha_t/alpha_s) x_s + sum_j C_j eps_{i-j},   C_j = -alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} L_j dlambda
``solver_type="tab"`` (the paper's tAB-DEIS): L_j is the Lagrange basis in the schedule's time t through the last
k step times, integrated by 64-point Gauss-Legendre quadrature (the official code uses a 10,000-point Riemann sum).
``solver_type="logrho"`` (diffusers' form): L_j in lambda = -log(rho), integrated exactly.
Order 1 of both is DDIM.
"""
from __future__ import annotations

from fastsample.expint import exp_lagrange_weights, quadrature_lagrange_weights
from fastsample.solver import Grid, Rule, Solver, lower_order_final_order

DEIS_SOLVER_TYPES = ("tab", "logrho")


class DEIS(Solver):
    name = "deis"
    prediction = "eps"

    def __init__(self, order: int = 3, solver_type: str = "tab", lower_order_final: bool = True, t_of_lambda=None):
        super().__init__(order)
        if solver_type not in DEIS_SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {DEIS_SOLVER_TYPES}, got {solver_type!r}")
        if solver_type == "tab" and t_of_lambda is None:
            raise ValueError("solver_type 'tab' needs the schedule's t_of_lambda")
        self.solver_type, self.lower_order_final, self.t_of_lambda = solver_type, lower_order_final, t_of_lambda

    def step_order(self, grid: Grid, i: int, available: int) -> int:
        return lower_order_final_order(grid, i, min(self.solver_order, available), self.lower_order_final)

    def rule(self, grid: Grid, i: int, k: int) -> Rule:
        a_s, s_s, l_s = grid.alpha[i], grid.sigma[i], grid.lam[i]
        a_t, l_t = grid.alpha[i + 1], grid.lam[i + 1]
        h = l_t - l_s
        if k == 1 or self.solver_type == "logrho":
            w = exp_lagrange_weights([grid.lam[i - j] - l_s for j in range(k)], h, "noise")
        else:
            w = quadrature_lagrange_weights([grid.t[i - j] for j in range(k)], l_s, h, self.t_of_lambda, "noise")
        scale = -a_t * s_s / a_s  # alpha_t e^{-lambda_s}
        return Rule(a_t / a_s, tuple(scale * wj for wj in w))


# ---------------------------------------------------------------------------- diffusers scheduler
from diffusers.configuration_utils import register_to_config  # noqa: E402

from fastsample.scheduler import FastScheduler, SchedulerMixin, shared_config  # noqa: E402,F401  (SchedulerMixin: pipeline reload)


class DEISScheduler(FastScheduler):
    """Drop-in for diffusers' ``DEISMultistepScheduler``: ``solver_type="tab"`` (default, the paper's tAB-DEIS) or
    ``"logrho"`` (equal to diffusers' DEIS); ``final_sigmas_type`` "sigma_min" (default, as diffusers) or "zero".
    The config stores the tAB form as ``deis_type="tab"`` with ``solver_type="logrho"``: diffusers' schedulers raise
    on solver_type values they do not know, and must still be able to load this config."""

    _peer_values = {"algorithm_type": {"dpmsolver": "deis", "dpmsolver++": "deis", "sde-dpmsolver": "deis",
                                       "sde-dpmsolver++": "deis"},
                    "solver_type": {"midpoint": "tab", "heun": "tab", "bh1": "tab", "bh2": "tab"}}

    @register_to_config
    @shared_config(final_sigmas_type="sigma_min")
    def __init__(self, solver_order: int = 2, algorithm_type: str = "deis", solver_type: str = "tab",
                 lower_order_final: bool = True, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential",
                 deis_type: str | None = None):
        if deis_type not in (None,) + DEIS_SOLVER_TYPES:
            raise ValueError(f"deis_type must be None or one of {DEIS_SOLVER_TYPES}, got {deis_type!r}")
        self._setup()
        if self.config.algorithm_type != "deis":
            raise ValueError(f"algorithm_type must be 'deis', got {algorithm_type!r}")

    def _remap_peer_values(self):
        super()._remap_peer_values()
        # diffusers' DEIS/DPM/UniPC schedulers raise NotImplementedError on solver_type "tab": keep a value they
        # know in the config and record the tAB form in deis_type, so that Theirs.from_config(ours.config) never
        # raises; deis_type leaves _use_default_values, else from_config would drop it
        if self.config.solver_type == "tab":
            defaults = sorted(k for k in self.config.get("_use_default_values", []) if k != "deis_type")
            self.register_to_config(solver_type="logrho", deis_type=self.config.deis_type or "tab",
                                    _use_default_values=defaults)

    def make_solver(self) -> Solver:
        c = self.config
        return DEIS(c.solver_order, c.deis_type or c.solver_type, c.lower_order_final, self.schedule.t_from_lambda)


from fastsample.registry import Variant, register  # noqa: E402

register("deis", DEISScheduler, diffusers_peer="DEISMultistepScheduler", peer_options={"solver_type": "logrho"},
         variants=[Variant("deis-tab3", {"solver_order": 3}, 3),
                   Variant("deis-logrho3", {"solver_order": 3, "solver_type": "logrho"}, 3)])
