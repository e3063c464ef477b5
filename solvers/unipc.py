"""UniPC (arXiv 2302.04867): unified predictor (UniP-p) and corrector (UniC-p), B(h) = bh1 | bh2.

Data form (hh = -h; noise form: hh = h with alpha <-> sigma):
    base:  x~ = (sigma_t/sigma_s) x_s - alpha_t expm1(hh) m0
    UniP:  x_t = x~ - alpha_t B(h) sum_k rho_k (m_k - m0)/r_k,          r_k = (lambda_{s_k} - lambda_s)/h
    UniC:  x_t^c = x~ - alpha_t B(h) (sum_k rho_k (m_k - m0)/r_k + rho_p (m_t - m0))
rho solves R rho = b with R[n, k] = r_k^n and b_n = g_n n!/B(h), g_1 = expm1(hh)/hh - 1, g_{n+1} = g_n/hh - 1/(n+1)!
(rho = 1/2 for UniP-2 and UniC-1).  The corrector reuses the model output at x_t that the next predictor needs,
so it costs no model call; it corrects the sample the previous step started from.
"""
from __future__ import annotations

import math

import numpy as np

from fastsample.solver import Grid, Rule, Solver

UNIPC_SOLVER_TYPES = ("bh1", "bh2")


class UniPC(Solver):
    name = "unipc"
    has_corrector = True

    def __init__(self, order: int = 2, solver_type: str = "bh2", predict_x0: bool = True,
                 lower_order_final: bool = True, disable_corrector=()):
        super().__init__(order)
        if solver_type not in UNIPC_SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {UNIPC_SOLVER_TYPES}, got {solver_type!r}")
        bad = [d for d in disable_corrector if isinstance(d, bool) or not isinstance(d, int)]
        if bad:
            raise ValueError(f"disable_corrector must be a list of step indices (ints), got {list(disable_corrector)!r}")
        self.solver_type, self.predict_x0, self.lower_order_final = solver_type, predict_x0, lower_order_final
        self.disable_corrector = frozenset(disable_corrector)
        self.prediction = "x0" if predict_x0 else "eps"

    @property
    def order(self) -> int:
        return self.solver_order + 1  # UniC raises the order by one

    def step_order(self, grid: Grid, i: int, available: int) -> int:
        k = min(self.solver_order, available)
        if self.lower_order_final:
            k = min(k, grid.num_steps - i)
        return k

    def uses_corrector(self, grid: Grid, i: int) -> bool:
        return i > 0 and (i - 1) not in self.disable_corrector

    def _base(self, grid: Grid, s: int, t: int):
        h = grid.lam[t] - grid.lam[s]
        hh = -h if self.predict_x0 else h
        if self.predict_x0:
            cx, scale = grid.sigma[t] / grid.sigma[s], grid.alpha[t]
        else:
            cx, scale = grid.alpha[t] / grid.alpha[s], grid.sigma[t]
        return h, hh, cx, scale

    def _rhos(self, hh: float, B: float, rks, n: int) -> np.ndarray:
        g, fact, b = math.expm1(hh) / hh - 1, 1, []
        for j in range(1, n + 1):
            b.append(g * fact / B)
            fact *= j + 1
            g = g / hh - 1 / fact
        R = np.vander(np.asarray(rks, dtype=np.float64), n, increasing=True).T
        return np.linalg.solve(R, np.asarray(b))

    def _combination(self, grid: Grid, s: int, t: int, k: int, rk_nodes, corrector: bool) -> Rule:
        """Weights on the history for a step s -> t of order k; ``rk_nodes`` are the grid indices of m_1..m_{k-1}."""
        h, hh, cx, scale = self._base(grid, s, t)
        if grid.sigma[t] == 0:  # to clean data: the exact first-order end point x = alpha_t x0
            if self.predict_x0:
                return Rule(0.0, (grid.alpha[t],))
            return Rule(cx, (-grid.alpha[t] * grid.sigma[s] / grid.alpha[s],))
        B = hh if self.solver_type == "bh1" else math.expm1(hh)
        c0 = -scale * math.expm1(hh)
        rks = [(grid.lam[j] - grid.lam[s]) / h for j in rk_nodes]
        off = 1 if corrector else 0  # corrector: history[0] is m_t, history[1] is m0
        coefs = [0.0] * (off + k)
        if corrector:
            if k == 1 and not math.isfinite(B):
                # bh1 over an infinite step (from pure noise, sigma = 1 on a flow schedule): B(h) = hh is infinite,
                # but B rho is not: with rho = g_1 / B it is g_1 = expm1(hh)/hh - 1 = -1, UniC-1's exact weight
                # (diffusers' rho = 1/2 is its small-h value)
                rho = np.array([(math.expm1(hh) / hh - 1) / B])
                brho = math.expm1(hh) / hh - 1
            else:
                rho = np.array([0.5]) if k == 1 else self._rhos(hh, B, rks + [1.0], k)
                brho = B * rho[-1]
            coefs[0] = -scale * brho
            c0 += scale * brho
        elif k == 1:
            rho = np.zeros(0)
        else:
            rho = np.array([0.5]) if k == 2 else self._rhos(hh, B, rks, k - 1)
        for j, rk in enumerate(rks):
            coefs[off + 1 + j] = -scale * B * rho[j] / rk
            c0 += scale * B * rho[j] / rk
        coefs[off] = c0
        return Rule(cx, tuple(coefs))

    def rule(self, grid: Grid, i: int, k: int) -> Rule:
        return self._combination(grid, i, i + 1, k, [i - j for j in range(1, k)], corrector=False)

    def corrector_rule(self, grid: Grid, i: int, k: int) -> Rule | None:
        return self._combination(grid, i - 1, i, k, [i - 1 - j for j in range(1, k)], corrector=True)


# ---------------------------------------------------------------------------- diffusers scheduler
from diffusers.configuration_utils import register_to_config  # noqa: E402

from fastsample.scheduler import FastScheduler, SchedulerMixin, shared_config  # noqa: E402,F401  (SchedulerMixin: pipeline reload)


class UniPCScheduler(FastScheduler):
    """Drop-in for diffusers' ``UniPCMultistepScheduler`` (same config keys, without the unsaveable ``solver_p``):
    UniP/UniC orders 1-3, bh1 | bh2, the corrector reusing the next model call, ``disable_corrector``."""

    _peer_values = {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2", "tab": "bh2"}}

    @register_to_config
    @shared_config
    def __init__(self, solver_order: int = 2, predict_x0: bool = True, solver_type: str = "bh2",
                 lower_order_final: bool = True, disable_corrector: list = [], use_karras_sigmas: bool = False,  # noqa: B006
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential",
                 sigma_min: float | None = None, sigma_max: float | None = None,
                 shift_terminal: float | None = None):
        self._setup()

    def make_solver(self) -> Solver:
        c = self.config
        return UniPC(c.solver_order, c.solver_type, c.predict_x0, c.lower_order_final, list(c.disable_corrector))


from fastsample.registry import Variant, register  # noqa: E402

# UniC raises the predictor's order by one
register("unipc", UniPCScheduler, diffusers_peer="UniPCMultistepScheduler",
         variants=[Variant("unipc1", {"solver_order": 1}, 2), Variant("unipc2", {"solver_order": 2}, 3),
                   Variant("unipc2-bh1", {"solver_order": 2, "solver_type": "bh1"}, 3),
                   Variant("unipc3", {"solver_order": 3}, 4),
                   Variant("unipc3-bh1", {"solver_order": 3, "solver_type": "bh1"}, 4)])
