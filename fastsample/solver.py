"""The solver protocol: a coefficient rule plus explicit state.

``Grid`` holds the N+1 noise levels of a run (float64 alpha, sigma, lambda and native time t).  A ``Solver``
turns (grid, step index, order) into a ``Rule``: the scalar coefficients of
    x_next = c_x * x + sum_j c_j * P_j + c_z * z            (P_0 the newest prediction, then older ones)
and optionally a corrector rule of the same form applied to the previous sample before the predictor (its
``c_z`` weighs the noise that the previous step drew, which a stochastic corrector reuses).
``State`` is explicit and immutable: the step index, the history of predictions (newest first), the orders
used so far and the sample the last step started from.  Nothing else is kept between steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .expint import combine
from .schedules import F64, NoiseSchedule
from .transforms import apply, check_transforms


@dataclass(frozen=True)
class Grid:
    alpha: tuple
    sigma: tuple
    lam: tuple
    t: tuple

    @classmethod
    def from_sigma_ve(cls, schedule: NoiseSchedule, sigmas_ve) -> "Grid":
        """N+1 levels from VE sigmas sigma/alpha; a trailing 0 is the clean end point (alpha = 1, sigma = 0)."""
        s = torch.as_tensor(sigmas_ve, dtype=F64)
        pos = s > 0
        t = torch.full_like(s, float("nan"))
        t[pos] = schedule.t_from_sigma_ve(s[pos])
        a, sg = torch.ones_like(s), torch.zeros_like(s)
        a[pos], sg[pos] = schedule.alpha_sigma(t[pos])
        if (~pos).any():  # sigma_ve = 0: the clean end point of the schedule
            t[~pos] = schedule.t_min
        lam = torch.where(pos, torch.log(a) - torch.log(sg.clamp_min(1e-300)), torch.full_like(s, math.inf))
        return cls(tuple(a.tolist()), tuple(sg.tolist()), tuple(lam.tolist()), tuple(t.tolist()))

    @classmethod
    def from_times(cls, schedule: NoiseSchedule, t) -> "Grid":
        t = torch.as_tensor(t, dtype=F64)
        a, s = schedule.alpha_sigma(t)
        return cls(tuple(a.tolist()), tuple(s.tolist()), tuple((torch.log(a) - torch.log(s)).tolist()), tuple(t.tolist()))

    @property
    def num_steps(self) -> int:
        return len(self.alpha) - 1


@dataclass(frozen=True)
class Rule:
    cx: float
    coefs: tuple
    noise: float = 0.0

    def __post_init__(self):  # Python floats, whatever numpy or torch scalars a rule computed with: torch.compile
        # (dynamo) and Tensor.add_(alpha=...) take Python numbers only
        object.__setattr__(self, "cx", float(self.cx))
        object.__setattr__(self, "coefs", tuple(float(c) for c in self.coefs))
        object.__setattr__(self, "noise", float(self.noise))


@dataclass(frozen=True)
class State:
    index: int = 0
    history: tuple = ()       # predictions, newest first
    orders: tuple = ()        # predictor order used at each past step
    last_x: torch.Tensor | None = None
    last_noise: torch.Tensor | None = None  # the noise the last step drew (a corrector that reuses it: SA-Solver)
    cache: dict = field(default_factory=dict, compare=False, repr=False)
    transforms: tuple = ()    # the run's prediction transforms (fastsample.transforms), in their declared order
    memos: tuple = ()         # each transform's per-run memory
    offsets: tuple | None = None  # per step: learned offsets of the (corrector, predictor) rules' values, or None
    stage: tuple = ()         # a staged solver's values carried from one call of a step to the next (BDIA-Heun)


def restarted(state: State, **changes) -> State:
    """``state`` with no memory of earlier steps (multistep history, last sample, a staged step's values): the next
    step starts as a run's first does."""
    return replace(state, history=(), orders=(), last_x=None, stage=(), **changes)


class Solver:
    """Base class: subclasses set ``name``, ``prediction`` ("x0" or "eps") and implement ``rule``."""

    name = "solver"
    prediction = "x0"
    stochastic = False
    has_corrector = False

    def __init__(self, order: int = 2):
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
            raise ValueError(f"solver_order must be 1, 2 or 3, got {order!r}")
        self.solver_order = order

    # --- what each solver says -------------------------------------------------------------------
    @property
    def order(self) -> int:
        """The convergence order of the ODE solver (what the convergence tests measure)."""
        return self.solver_order

    def step_order(self, grid: Grid, i: int, available: int) -> int:
        """The order used at step i given ``available`` usable predictions (the newest included)."""
        return min(self.solver_order, available)

    def rule(self, grid: Grid, i: int, k: int) -> Rule:
        raise NotImplementedError

    def corrector_rule(self, grid: Grid, i: int, k: int) -> Rule | None:
        return None

    def uses_corrector(self, grid: Grid, i: int) -> bool:
        return self.has_corrector

    # --- generic machinery ---------------------------------------------------------------------
    def init(self, grid: Grid, transforms=(), coefficients=None) -> State:
        """A fresh state for a run on ``grid``, with the run's prediction transforms (``fastsample.transforms``:
        DualFast, DC-Solver's compensation), applied by ``step`` in the order given, and optional learned
        ``coefficients``: per step ``{"predictor": [d_cx, d_c0, ...], "corrector": [...]}``, offsets added to the
        step's rule values (its ``cx`` then its ``coefs``); an empty list leaves that rule as it is."""
        transforms = check_transforms(transforms)
        if coefficients is not None:
            if type(self).step is not Solver.step:
                raise ValueError(f"learned coefficients need a solver that takes the generic multistep step, not "
                                 f"{type(self).__name__}")
            coefficients = check_coefficients(coefficients, grid.num_steps)
        return State(transforms=transforms, memos=tuple(t.start() for t in transforms), offsets=coefficients)

    def _cached(self, state: State, key, fn):
        c = state.cache.get(key)
        if c is None:
            c = state.cache[key] = fn()
        return c

    def usable(self, grid: Grid, i: int, n_hist: int) -> int:
        """History entries (newest first, the new prediction included) at finite lambda: an entry at pure
        noise (lambda = -inf, e.g. a flow model's sigma = 1) cannot enter a polynomial in lambda."""
        k = 0
        while k < n_hist and math.isfinite(grid.lam[i - k]):
            k += 1
        return max(k, 1)

    def step(self, grid: Grid, state: State, x: torch.Tensor, pred: torch.Tensor, noise=None):
        """One step from node ``state.index``: returns (x at the next node, new state)."""
        i = state.index
        if i >= grid.num_steps:
            raise RuntimeError(f"step {i} is past the end of the {grid.num_steps}-step grid: call set_timesteps again")
        hist, memos = apply("prediction", state.transforms, state.memos, grid, i, x, (pred,) + state.history)
        if state.last_x is not None and state.orders and self.uses_corrector(grid, i):
            k = state.orders[-1]
            rule = self._cached(state, ("c", i, k), lambda: offset_rule(self.corrector_rule(grid, i, k), state, i,
                                                                        "corrector"))
            if rule is not None:
                x = combine(rule.cx, state.last_x, rule.coefs, hist, rule.noise, state.last_noise)
        hist, memos = apply("history", state.transforms, memos, grid, i, x, hist)
        k = self.step_order(grid, i, self.usable(grid, i, len(hist)))
        rule = self._cached(state, ("p", i, k), lambda: offset_rule(self.rule(grid, i, k), state, i, "predictor"))
        x_next = combine(rule.cx, x, rule.coefs, hist, rule.noise, noise)
        keep = self.solver_order + (1 if self.has_corrector else 0)
        new = replace(state, index=i + 1, history=hist[:keep], orders=(state.orders + (k,))[-4:], last_x=x,
                      last_noise=noise, memos=memos)
        return x_next, new

    def calls(self, grid: Grid) -> list[tuple[int, int]]:
        """The model calls of a solve on ``grid``, in order, as (grid node the model is evaluated at, step they
        belong to).  One call a step at its start node for the multistep solvers; a staged solver (Heun) lists
        several calls for a step, and ``step`` is called once per call."""
        return [(i, i) for i in range(grid.num_steps)]

    def needs_noise(self, grid: Grid, i: int) -> bool:
        return self.stochastic and grid.sigma[i + 1] > 0

    def brownian_time(self, lam: float) -> float:
        """u(lambda), increasing: a step's noise z is the standardised increment of one Brownian motion B(e^u)
        between the step's ends, so that a Brownian tree gives consistent noise across step counts.  For the
        DPM-Solver++ SDEs u = 2 eta lambda (their noise is sigma_t sqrt(1 - e^(-2 eta h)) z)."""
        return 2 * getattr(self, "eta", 1.0) * lam


COEFFICIENT_PARTS = ("predictor", "corrector")


def check_coefficients(coefficients, n: int, name: str = "learned_coefficients") -> tuple:
    """``n`` per-step entries ``{"predictor": [...], "corrector": [...]}`` of finite offsets, as a tuple of dicts of
    float tuples."""
    if not isinstance(coefficients, (list, tuple)) or len(coefficients) != n:
        got = len(coefficients) if isinstance(coefficients, (list, tuple)) else type(coefficients).__name__
        raise ValueError(f"{name} must hold one entry per step ({n}), got {got}")
    out = []
    for i, entry in enumerate(coefficients):
        if not isinstance(entry, dict) or not set(entry) <= set(COEFFICIENT_PARTS):
            raise ValueError(f"{name}[{i}] must be a dict with the keys {COEFFICIENT_PARTS}, got {entry!r}")
        step = {}
        for part in COEFFICIENT_PARTS:
            values = entry.get(part, [])
            if not isinstance(values, (list, tuple)) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise ValueError(f"{name}[{i}][{part!r}] must be a list of finite numbers, got {values!r}")
            step[part] = tuple(float(v) for v in values)
        out.append(step)
    return tuple(out)


def offset_rule(rule: Rule | None, state: State, i: int, part: str) -> Rule | None:
    """``rule`` with the state's learned offsets for step ``i``'s ``part`` added to its cx and coefs."""
    if rule is None or state.offsets is None or not state.offsets[i][part]:
        return rule
    d = state.offsets[i][part]
    if len(d) != 1 + len(rule.coefs):
        raise ValueError(f"learned_coefficients[{i}][{part!r}] holds {len(d)} offsets, but the step's {part} rule has "
                         f"{1 + len(rule.coefs)} values (cx and {len(rule.coefs)} coefs): they were fitted for another "
                         f"solver order or grid")
    return Rule(rule.cx + d[0], tuple(c + dj for c, dj in zip(rule.coefs, d[1:])), rule.noise)


def lower_order_final_order(grid: Grid, i: int, k: int, lower_order_final: bool, first_order_final: bool = False) -> int:
    """Order ``k`` at step i as diffusers' DPM-Solver and DEIS cut it: order 1 at the last step when it goes into
    clean data (sigma 0) or ``first_order_final`` holds (DPM's ``euler_at_final``), and with ``lower_order_final`` on a
    grid of under 15 steps, order 1 at the last step and at most 2 at the one before."""
    n = grid.num_steps
    short = lower_order_final and n < 15
    if i == n - 1 and (first_order_final or short or grid.sigma[n] == 0):
        return 1
    if i == n - 2 and short:
        return min(k, 2)
    return k


def step_from_pure_noise(grid: Grid, state: State, x: torch.Tensor, x0: torch.Tensor):
    """A noise-prediction solver's step from alpha = 0 (flow sigma 1): there the noise is x / sigma exactly and
    carries nothing of the model, so the step is the exact first-order (DDIM) step through the data prediction x0,
    x' = (sigma'/sigma) x + alpha' x0.  The next steps use no history from this node (its lambda is -inf) and no
    corrector of this step.  Returns (x at the next node, new state)."""
    i = state.index
    x_next = torch.mul(x0, grid.alpha[i + 1]).add_(x, alpha=grid.sigma[i + 1] / grid.sigma[i])
    return x_next, replace(state, index=i + 1, history=(x / grid.sigma[i],), orders=(), last_x=None)
