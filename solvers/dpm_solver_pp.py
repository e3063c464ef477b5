"""DPM-Solver++ multistep (arXiv 2211.01095) and its SDE variants, orders 1-3.

Data form (dpmsolver++, sde-dpmsolver++), with H = (1 + eta) h and eta the SDE noise strength (0 = ODE):
    x_t = (sigma_t/sigma_s) e^{-eta h} x_s - alpha_t expm1(-H) D0 + alpha_t c1 D1 - alpha_t c2 D2 + sigma_t sqrt(-expm1(-2 eta h)) z
    midpoint: c1 = -expm1(-H)/2;  heun / third order: c1 = phi2 = expm1(-H)/H + 1;  c2 = phi3 = phi2/H - 1/2
with D1 = (m0 - m1)/r0 (order 2) or D1 = D1_0 + r0/(r0+r1)(D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1) (order 3).
``third_order="reference"`` keeps the official code's c2 (equal to diffusers); ``"exact"`` doubles it, which is the
Taylor coefficient of D2 and makes 3M truly third order (see the note in ``__init__``).
The SDE 3M follows k-diffusion's dpmpp_3m_sde (c2 = phi3(H)); diffusers' sde-dpmsolver++ order 3 flips the sign of
the 1/2 in c2, so its D2 term is O(1) instead of O(h) and ours differs from it there.
Noise form (dpmsolver, sde-dpmsolver) is the same with eps, alpha <-> sigma and h -> -h.
"""
from __future__ import annotations

import math

from fastsample.solver import Grid, Rule, Solver, lower_order_final_order

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")
THIRD_ORDER_FORMS = ("reference", "exact")


def _difference_weights(k: int, r0: float, r1: float = 0.0):
    """(D0, D1, D2) as weights on (m0, m1, m2)."""
    if k == 1:
        return (1.0,), (0.0,), (0.0,)
    if k == 2:
        return (1.0, 0.0), (1 / r0, -1 / r0), (0.0, 0.0)
    d10 = (1 / r0, -1 / r0, 0.0)
    d11 = (0.0, 1 / r1, -1 / r1)
    d2 = tuple((a - b) / (r0 + r1) for a, b in zip(d10, d11))
    d1 = tuple(a + r0 * c for a, c in zip(d10, d2))
    return (1.0, 0.0, 0.0), d1, d2


class DPMSolverPlusPlus(Solver):
    name = "dpmsolver++"

    def __init__(self, order: int = 2, algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 eta: float | None = None, lower_order_final: bool = True, euler_at_final: bool = False,
                 third_order: str = "reference"):
        super().__init__(order)
        if third_order not in THIRD_ORDER_FORMS:
            raise ValueError(f"third_order must be one of {THIRD_ORDER_FORMS}, got {third_order!r}")
        # The official code's (and diffusers') 3M weights D2 by phi3 = phi2/h - 1/2, half the Taylor coefficient
        # 2 (h^2/2 - h + 1 - e^{-h}) / h^2 of the quadratic through three outputs: that step is second order
        # (measured slope 2.1 on the exact testbed).  "exact" uses the full coefficient: third order (slope 3.2).
        self.third_order = third_order
        self._d2_factor = 2.0 if third_order == "exact" else 1.0
        if algorithm_type not in ALGORITHM_TYPES:
            raise ValueError(f"algorithm_type must be one of {ALGORITHM_TYPES}, got {algorithm_type!r}")
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
        sde = algorithm_type.startswith("sde-")
        if eta is None:
            eta = 1.0 if sde else 0.0
        if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        if eta > 0 and not sde:
            raise ValueError(f"eta = {eta} > 0 needs algorithm_type 'sde-dpmsolver++' (or 'sde-dpmsolver'), got {algorithm_type!r}")
        if algorithm_type == "sde-dpmsolver" and (order == 3 or eta != 1.0):
            raise ValueError("algorithm_type 'sde-dpmsolver' supports solver_order 1-2 with eta = 1; use 'sde-dpmsolver++'")
        self.algorithm_type, self.solver_type, self.eta = algorithm_type, solver_type, float(eta)
        self.lower_order_final, self.euler_at_final = lower_order_final, euler_at_final
        self.prediction = "x0" if algorithm_type.endswith("++") else "eps"
        self.stochastic = self.eta > 0

    def step_order(self, grid: Grid, i: int, available: int) -> int:
        return lower_order_final_order(grid, i, min(self.solver_order, available), self.lower_order_final, self.euler_at_final)

    def rule(self, grid: Grid, i: int, k: int) -> Rule:
        a_s, s_s, l_s = grid.alpha[i], grid.sigma[i], grid.lam[i]
        a_t, s_t, l_t = grid.alpha[i + 1], grid.sigma[i + 1], grid.lam[i + 1]
        h = l_t - l_s
        r0 = (l_s - grid.lam[i - 1]) / h if k >= 2 else 0.0
        r1 = (grid.lam[i - 1] - grid.lam[i - 2]) / h if k >= 3 else 0.0
        D0, D1, D2 = _difference_weights(k, r0, r1)
        eta = self.eta
        if self.prediction == "x0":
            if s_t == 0:  # to clean data: x = D0 exactly (first order only)
                return Rule(0.0, tuple(a_t * w for w in D0))
            H = (1 + eta) * h
            em = math.expm1(-H)
            phi2 = em / H + 1
            c0, scale, cx = -a_t * em, a_t, s_t / s_s * (math.exp(-eta * h) if eta > 0 else 1.0)
            noise = s_t * math.sqrt(-math.expm1(-2 * eta * h)) if eta > 0 else 0.0
            if k == 2 and self.solver_type == "midpoint":
                c1, c2 = -0.5 * em, 0.0
            else:
                c1, c2 = phi2, -(phi2 / H - 0.5) * self._d2_factor
        else:
            if s_t == 0:  # to clean data: x = alpha_t (x - sigma_s eps) / alpha_s
                return Rule(a_t / a_s, tuple(-a_t * s_s / a_s * w for w in D0))
            sde = self.algorithm_type == "sde-dpmsolver"
            ep = math.expm1(h)
            cx, scale = a_t / a_s, -s_t
            c0 = -s_t * ep * (2.0 if sde else 1.0)
            noise = s_t * math.sqrt(math.expm1(2 * h)) if sde else 0.0
            if k == 2 and self.solver_type == "midpoint":
                c1, c2 = (1.0 if sde else 0.5) * ep, 0.0
            else:
                c1, c2 = (ep / h - 1) * (2.0 if sde else 1.0), ((ep - h) / h ** 2 - 0.5) * self._d2_factor
        coefs = tuple(c0 * w0 + scale * (c1 * w1 + c2 * w2) for w0, w1, w2 in zip(D0, D1, D2))
        return Rule(cx, coefs, noise)


# ---------------------------------------------------------------------------- diffusers scheduler
import torch  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402

from fastsample.scheduler import FastScheduler, SchedulerMixin, shared_config  # noqa: E402,F401  (SchedulerMixin: pipeline reload)


class DPMSolverPlusPlusScheduler(FastScheduler):
    """Drop-in for diffusers' ``DPMSolverMultistepScheduler`` (same config keys), plus ``eta`` (SDE noise strength
    in [0, 1] for ``sde-dpmsolver++``), ``noise_type`` ("gaussian" | "brownian_tree") and ``spacing`` (one string
    for the step spacing: see ``fastsample.timesteps.SPACINGS``).  Takes ``sigmas=`` in ``set_timesteps``."""

    _peer_values = {"algorithm_type": {"deis": "dpmsolver++"},
                    "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint", "tab": "midpoint"}}

    @register_to_config
    @shared_config
    def __init__(self, solver_order: int = 2, algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_lu_lambdas: bool = False, lambda_min_clipped: float = -float("inf"),
                 variance_type: str | None = None, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", eta: float | None = None, noise_type: str = "gaussian",
                 third_order: str = "reference"):
        if variance_type not in (None, "learned", "learned_range"):
            raise ValueError(f"variance_type must be None, 'learned' or 'learned_range', got {variance_type!r}")
        self._setup()

    def make_solver(self) -> Solver:
        c = self.config
        return DPMSolverPlusPlus(c.solver_order, c.algorithm_type, c.solver_type, c.eta, c.lower_order_final,
                                 c.euler_at_final, c.third_order)

    def _last_timestep(self) -> int:
        """lambda_min_clipped cuts the noisiest timesteps off (needed for squaredcos_cap_v2)."""
        lam = -torch.as_tensor(self.vp.log_sigmas)
        cut = self.config.lambda_min_clipped
        if isinstance(cut, bool) or not isinstance(cut, (int, float)) or math.isnan(cut):
            raise ValueError(f"lambda_min_clipped must be a number (a log-SNR; -inf keeps every timestep), got {cut!r}")
        clipped = int(torch.searchsorted(torch.flip(lam, [0]), torch.tensor(cut, dtype=lam.dtype)))
        last = self.config.num_train_timesteps - clipped
        if last < 2:
            raise ValueError(f"lambda_min_clipped={cut} cuts off every timestep but {last}: the schedule's half log-SNR "
                             f"lies in [{float(lam[-1]):.4g}, {float(lam[0]):.4g}]; lambda_min_clipped must be below "
                             f"{float(lam[1]):.4g}")
        return last


from fastsample.registry import Variant, register  # noqa: E402

register("dpmsolver++", DPMSolverPlusPlusScheduler, aliases=("dpm",), diffusers_peer="DPMSolverMultistepScheduler",
         variants=[Variant("ddim", {"solver_order": 1}, 1), Variant("dpm++2m", {"solver_order": 2}, 2),
                   Variant("dpm++2m-heun", {"solver_order": 2, "solver_type": "heun"}, 2),
                   # the official code's (and diffusers') 3M weights are second order (see the module docstring)
                   Variant("dpm++3m", {"solver_order": 3}, 2),
                   Variant("dpm++3m-exact", {"solver_order": 3, "third_order": "exact"}, 3),
                   Variant("sde-dpm++2m", {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}, None, 1.0),
                   # k-diffusion's and ComfyUI's dpmpp_2m_sde_heun (exact in alpha and sigma, so flow-safe)
                   Variant("sde-dpm++2m-heun", {"solver_order": 2, "algorithm_type": "sde-dpmsolver++",
                                                "solver_type": "heun"}, None, 1.0),
                   # k-diffusion's dpmpp_3m_sde (its second step with phi_2: solver_type "heun")
                   Variant("sde-dpm++3m", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++",
                                           "solver_type": "heun"}, None, 1.0)])
