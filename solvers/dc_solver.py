"""DC-Solver (arXiv 2409.03755): dynamic compensation of the predictor-corrector's misalignment.

After the corrector at step i, the newest buffered data prediction Q_i was evaluated at the uncorrected sample.
Dynamic compensation replaces it by the Lagrange interpolation of Q_i, Q_{i-1}, Q_{i-2} (over model time t) at the
shifted time t'_i = rho_i t_i + (1 - rho_i) t_{i-1}, before the predictor to t_{i+1}.  rho = 1 is the identity;
steps 0 and 1 (fewer than three predictions) are never compensated.  One ratio per step is fitted greedily against
a many-step teacher (``fit_dc_ratios``); cascade polynomial regression (``CPR``) predicts ratios for unseen
NFE / guidance scales.  The compensation is a prediction transform (``fastsample.transforms``), so it plugs into DPM-Solver++ as well
and stacks with DualFast.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from fastsample.solver import Grid
from fastsample.transforms import Transform

DC_ORDERS = (2,)
BASE_SOLVERS = ("unipc", "dpmsolver++")
FIRST_COMPENSATED = 2  # the first step with three buffered predictions


def lagrange_at(t_new, nodes):
    """Weights w_k with sum_k w_k f(nodes[k]) = p(t_new) for the polynomial p through the nodes; ``t_new`` may be a
    tensor (weights then carry its gradient)."""
    weights = []
    for k, tk in enumerate(nodes):
        w = 1.0
        for m, tm in enumerate(nodes):
            if m != k:
                w = w * (t_new - tm) / (tk - tm)
        weights.append(w)
    return weights


class DynamicCompensation(Transform):
    """The compensation, a "history" transform (``fastsample.transforms``): ``ratios[i]`` for step i (a float, or
    a tensor while fitting)."""

    stage = "history"

    def __init__(self, ratios, order: int = 2):
        if order not in DC_ORDERS:
            raise ValueError(f"dc_order must be one of {DC_ORDERS}, got {order!r}")
        self.ratios, self.order = list(ratios), order

    @property
    def identity(self) -> bool:
        return all(not torch.is_tensor(r) and r == 1.0 for r in self.ratios)

    def __call__(self, grid: Grid, i: int, x, hist: tuple, memo=None):
        if i < FIRST_COMPENSATED or len(hist) < self.order + 1:
            return hist, memo
        rho = self.ratios[i]
        if not torch.is_tensor(rho) and rho == 1.0:
            return hist, memo
        nodes = [grid.t[i - k] for k in range(self.order + 1)]
        t_new = rho * nodes[0] + (1 - rho) * nodes[1]
        q = sum(w * h for w, h in zip(lagrange_at(t_new, nodes), hist))
        return (q,) + hist[1:], memo


# a ratio rho puts the compensated prediction at t_i + (rho - 1)(t_i - t_{i-1}): beyond 2 intervals either side of
# t_i the Lagrange extrapolation is no longer a compensation (rho = -100 gave |x| ~ 1e31)
RATIO_RANGE = (-1.0, 3.0)


def check_ratios(ratios, num_steps: int, source: str = "dc_ratios") -> list[float]:
    ratios = [float(r) for r in ratios]
    if len(ratios) != num_steps:
        raise ValueError(f"{source} must have one ratio per step ({num_steps}), got {len(ratios)}")
    lo, hi = RATIO_RANGE
    bad = [r for r in ratios if not lo <= r <= hi]  # NaN fails too
    if bad:
        raise ValueError(f"{source} must be finite ratios in [{lo}, {hi}] (1: no compensation), got {bad} in "
                         f"{ratios}")
    return ratios


# ---------------------------------------------------------------------------- cascade polynomial regression
class CPR:
    """rho(i) = sum_{k=0..3} a_k x^k, x = i/NFE, a_k = sum_j u_kj CFG'^(2-j), u_kj = sum_l c_kjl NFE'^(2-l) with
    CFG' = CFG/12, NFE' = NFE/50: 36 coefficients c, linear in the features, fitted by least squares."""

    def __init__(self, coefficients, base_solver: str):
        c = np.asarray(coefficients, dtype=np.float64)
        if c.shape != (36,) or not np.isfinite(c).all():
            raise ValueError(f"CPR needs 36 finite coefficients, got shape {c.shape}")
        if base_solver not in BASE_SOLVERS:
            raise ValueError(f"base_solver must be one of {BASE_SOLVERS}, got {base_solver!r}")
        self.coefficients, self.base_solver = c, base_solver

    @staticmethod
    def features(i, nfe: int, guidance: float) -> np.ndarray:
        x, g, n = np.asarray(i, dtype=np.float64) / nfe, guidance / 12.0, nfe / 50.0
        cols = [x ** k * g ** (2 - j) * n ** (2 - m) for k in range(4) for j in range(3) for m in range(3)]
        return np.stack(cols, axis=-1)

    @classmethod
    def fit(cls, fitted: list[dict], base_solver: str) -> "CPR":
        """``fitted``: dicts with "ratios" (one per step), "nfe" and "guidance_scale" (1 without guidance)."""
        rows, targets = [], []
        for f in fitted:
            idx = np.arange(FIRST_COMPENSATED, f["nfe"])
            rows.append(cls.features(idx, f["nfe"], f.get("guidance_scale", 1.0)))
            targets.append(np.asarray(f["ratios"], dtype=np.float64)[idx])
        coef, *_ = np.linalg.lstsq(np.concatenate(rows), np.concatenate(targets), rcond=None)
        return cls(coef, base_solver)

    def predict(self, nfe: int, guidance_scale: float = 1.0) -> list[float]:
        rho = self.features(np.arange(nfe), nfe, guidance_scale) @ self.coefficients
        rho[:FIRST_COMPENSATED] = 1.0
        return rho.tolist()

    def to_dict(self) -> dict:
        return {"method": "dc-solver-cpr", "base_solver": self.base_solver, "coefficients": self.coefficients.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "CPR":
        if d.get("method") != "dc-solver-cpr":
            raise ValueError(f"not a DC-Solver CPR file (method={d.get('method')!r})")
        return cls(d["coefficients"], d["base_solver"])

    def save(self, path, fitted_model_hash: str | None = None):
        """Write the coefficients as JSON; ``fitted_model_hash``, the weights the fits came from, goes with them."""
        d = self.to_dict() | ({"fitted_model_hash": fitted_model_hash} if fitted_model_hash else {})
        Path(path).write_text(json.dumps(d, indent=1))

    @classmethod
    def load(cls, path) -> "CPR":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------- fitting
FIT_OBJECTIVES = ("greedy", "end")


def _fitting_run(model, scheduler, ratios: list, model_kwargs: dict):
    """What both fits drive: the scheduler set to ``len(ratios)`` steps, its grid, solver and config, the compensation
    being fitted (from ``ratios``), the scheduler's other transforms (DualFast) followed by it,
    and the model call at a grid node."""
    from fastsample.sampling import model_output

    scheduler.set_timesteps(len(ratios))
    grid, solver, cfg = scheduler.grid, scheduler.solver, scheduler.config
    model_time = scheduler.model_time(grid)
    comp = DynamicCompensation(ratios, cfg.get("dc_order", 2))
    transforms = tuple(t for t in scheduler.prediction_transforms(grid.num_steps)
                       if not isinstance(t, DynamicCompensation)) + (comp,)

    def call(x, i):
        return model_output(model(x, model_time(i), **model_kwargs))

    return grid, solver, cfg, comp, transforms, call


def fit_dc_ratios(model, scheduler, noise: torch.Tensor, num_inference_steps: int, iterations: int = 30,
                  lr: float = 0.1, per_step: int = 20, reference=None, objective: str = "greedy",
                  end_iterations: int = 60, end_lr: float = 0.02, **model_kwargs) -> list[float]:
    """Greedy search of one ratio per step: for i = 2..N-1, AdamW on rho_i minimises the mean squared distance
    between the sample the solver reaches at t_{i+1} (after the corrector, for UniPC) and the teacher's
    (``fastsample.sampling.reference_states``, ``per_step`` UniPC-3 steps per interval, from the same noise).
    The best ratio seen is kept.  ``model(x, t, **model_kwargs)`` returns the scheduler's ``prediction_type``.

    ``objective="end"`` then refines all the ratios jointly from the greedy ones (``refine_dc_ratios``): Adam
    (``end_iterations`` full-batch steps of ``end_lr``) on the mean squared distance of the run's end point to the
    teacher's, the error a user sees; the greedy fit matches each step's next state alone, blind to how a ratio's
    error carries to the end."""
    if objective not in FIT_OBJECTIVES:
        raise ValueError(f"objective must be one of {FIT_OBJECTIVES}, got {objective!r}")
    from fastsample.driver import call_step, drive
    from fastsample.sampling import reference_states

    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1 (0 would record every ratio as 1, unfitted), got "
                         f"{iterations!r}")
    ratios = [1.0] * num_inference_steps
    grid, solver, cfg, comp, transforms, call = _fitting_run(model, scheduler, ratios, model_kwargs)
    n = grid.num_steps
    with torch.no_grad():
        ref = reference if reference is not None else reference_states(model, noise, scheduler, per_step, **model_kwargs)

    def reach(state, x, out, i):  # the sample at node i + 1 that the next step continues from (after its corrector)
        x1, st = call_step(solver, grid, state, x, out, cfg.prediction_type, i, i)
        if i + 1 == n:
            return x1
        return call_step(solver, grid, st, x1, call(x1, i + 1), cfg.prediction_type, i + 1, i + 1)[1].last_x

    def fit(i, _, x, out, state):  # before step i's update: its ratio, the rest of the run's fixed
        if i < FIRST_COMPENSATED:
            return
        rho = torch.ones((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.AdamW([rho], lr=lr)
        best = (math.inf, 1.0)
        with torch.enable_grad():
            for _ in range(iterations):
                comp.ratios[i] = rho
                loss = (reach(state, x, out, i) - ref[i + 1]).square().mean()
                if loss.item() < best[0]:
                    best = (loss.item(), rho.item())
                opt.zero_grad()
                loss.backward()
                opt.step()
        ratios[i] = comp.ratios[i] = best[1]

    with torch.no_grad():
        drive(solver, grid, noise * scheduler.init_noise_sigma, call, cfg.prediction_type, transforms, callback=fit)
    ratios = check_ratios(ratios, n, f"the ratios fitted for {n} steps")
    if objective == "end":
        ratios = refine_dc_ratios(model, scheduler, noise, ratios, ref[-1], end_iterations, end_lr, **model_kwargs)
    return ratios


def refine_dc_ratios(model, scheduler, noise: torch.Tensor, ratios: list, target: torch.Tensor,
                     iterations: int = 60, lr: float = 0.02, **model_kwargs) -> list[float]:
    """Adam on every compensated step's ratio at once (steps 2..N-1), from ``ratios``, minimising the mean squared
    distance of the N-step run's end point from ``noise`` to ``target`` (the teacher's end points).  Returns the
    best iterate seen whose ratios all lie in ``RATIO_RANGE``; the starting ratios count, so the refinement never
    ends worse on its own latents than it began."""
    from fastsample.driver import drive

    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"end_iterations must be an integer >= 1, got {iterations!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"end_lr must be a finite number > 0, got {lr!r}")
    if target.shape != noise.shape:
        raise ValueError(f"target must be the teacher's end points, shaped like noise {tuple(noise.shape)}, got "
                         f"{tuple(target.shape)}")
    n = len(ratios)
    grid, solver, cfg, comp, transforms, call = _fitting_run(model, scheduler, list(ratios), model_kwargs)
    free = torch.tensor(ratios[FIRST_COMPENSATED:], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([free], lr=lr)
    lo, hi = RATIO_RANGE
    best = (math.inf, list(ratios))

    with torch.enable_grad():
        for it in range(iterations + 1):  # the last pass only scores the last update
            comp.ratios = list(ratios[:FIRST_COMPENSATED]) + list(free)
            x, _ = drive(solver, grid, noise * scheduler.init_noise_sigma, call, cfg.prediction_type, transforms)
            loss = (x - target).double().square().mean()
            current = [float(r) for r in ratios[:FIRST_COMPENSATED]] + free.detach().tolist()
            if loss.item() < best[0] and all(lo <= r <= hi for r in current):
                best = (loss.item(), current)
            if it == iterations:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    return check_ratios(best[1], n, f"the ratios refined for {n} steps")


# ---------------------------------------------------------------------------- diffusers scheduler
from diffusers.configuration_utils import register_to_config  # noqa: E402

from fastsample.scheduler import FastScheduler, SchedulerMixin, shared_config  # noqa: E402,F401  (SchedulerMixin: pipeline reload)
from fastsample.solver import Solver  # noqa: E402

from .dpm_solver_pp import DPMSolverPlusPlus  # noqa: E402
from .unipc import UniPC, UniPCScheduler  # noqa: E402


class DCSolverScheduler(FastScheduler):
    """UniPC (or, with ``base_solver="dpmsolver++"``, DPM-Solver++) with dynamic compensation.  ``dc_ratios``: one
    ratio per inference step (a JSON list in the config); or ``cpr``: a CPR dict (or a path to its JSON) that
    predicts the ratios for any step count at ``cpr_guidance_scale``.  With neither, every ratio is 1: the base
    solver exactly."""

    # a peer's solver_type (DPM's midpoint/heun, DEIS's logrho/tab) maps to DC's default base, UniPC bh1
    _peer_values = {"solver_type": {"midpoint": "bh1", "heun": "bh1", "logrho": "bh1", "tab": "bh1"}}

    @register_to_config
    @shared_config(like=UniPCScheduler)
    def __init__(self, solver_order: int = 3, solver_type: str = "bh1", dc_ratios: list | None = None,
                 dc_order: int = 2, base_solver: str = "unipc", cpr=None, cpr_guidance_scale: float = 1.0):
        if base_solver not in BASE_SOLVERS:
            raise ValueError(f"base_solver must be one of {BASE_SOLVERS}, got {base_solver!r}")
        if dc_order not in DC_ORDERS:
            raise ValueError(f"dc_order must be one of {DC_ORDERS}, got {dc_order!r}")
        if dc_ratios is not None and cpr is not None:
            raise ValueError("pass dc_ratios or cpr, not both")
        if isinstance(cpr, (str, Path)):
            self.register_to_config(cpr=CPR.load(cpr).to_dict())
        if self.config.cpr is not None:
            model = CPR.from_dict(self.config.cpr)
            if model.base_solver != base_solver:
                raise ValueError(f"the CPR file was fitted for base_solver={model.base_solver!r}, "
                                 f"this scheduler uses {base_solver!r}")
        if dc_ratios is not None:
            check_ratios(dc_ratios, len(dc_ratios))
        self._setup()

    def make_solver(self) -> Solver:
        c = self.config
        if c.base_solver == "unipc":
            solver = UniPC(c.solver_order, c.solver_type, c.predict_x0, c.lower_order_final, list(c.disable_corrector))
        else:
            solver = DPMSolverPlusPlus(c.solver_order, lower_order_final=c.lower_order_final)
        return solver

    def prediction_transforms(self, n: int) -> tuple:
        """The base transforms (DualFast), then the compensation for an ``n``-step run (none while every ratio is 1)."""
        comp = self.compensation_for(n)
        return super().prediction_transforms(n) + (() if comp.identity else (comp,))

    def compensation_for(self, n: int) -> DynamicCompensation:
        """The compensation transform for an ``n``-step grid: the config's ratios, its CPR's prediction, or all 1."""
        c = self.config
        if c.dc_ratios is not None:
            ratios = check_ratios(c.dc_ratios, n)
        elif c.cpr is not None:
            ratios = check_ratios(CPR.from_dict(c.cpr).predict(n, c.cpr_guidance_scale), n,
                                  f"the CPR-predicted ratios for {n} steps at guidance {c.cpr_guidance_scale}")
        else:
            ratios = [1.0] * n
        return DynamicCompensation(ratios, c.dc_order)


from fastsample.registry import Variant, register  # noqa: E402

# with no ratios (all 1) DC-Solver is its base, UniPC-3 bh1; fitted ratios come from fit_dc_ratios or a CPR
register("dc", DCSolverScheduler, variants=[Variant("dc-unipc3", {"solver_order": 3}, 4)])
