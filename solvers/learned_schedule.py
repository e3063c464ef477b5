"""Learned time schedules: the steps of any fastsample solver fitted to a model against a many-step teacher.

``method="dp"`` is GITS-style (ICML 2024): on a fine grid of M levels (the scheduler's own M-step grid, so every
candidate is a level the scheduler can take), the teacher's trajectory is computed once, with the model's data
prediction at every fine level; the cost of one step from fine level i to j is the mean squared distance between a
first-order (DDIM) step from the teacher's state at i and the teacher's state at j; dynamic programming picks the N
steps from the first to the last level with the least total cost.  Seconds, no gradients.

``method="gradient"`` is LD3-style (ICLR 2025): the N - 1 inner levels are lambda_0 + (lambda_cap - lambda_0) times the
cumulative sums of softmax(theta) (N logits; the first and last levels stay the scheduler's own), and theta is fitted
by Adam through the whole N-step solve against the teacher's end points (mean squared error).  The solver's
coefficients are plain float functions of the grid; they enter autograd through one function of the N - 1 inner
lambdas whose Jacobian is taken by central differences in float64, so every solver here is differentiable as it
is.  The model's time is the exact fractional time of each level, and the gradient flows through the model's time
embedding too.  ``ball`` > 0 is LD3's relaxation: the student starts from noise + delta, with ||delta|| <= ball *
||noise|| per sample, delta fitted along with theta (only theta is kept).  ``scales=True`` also fits one positive
scale per step on the solver's prediction (x0 or eps), the continuous analogue of LSD's per-step output scales; a
scheduler carries them as ``learned_scales``.  ``coefficients=True`` also fits an additive offset of every value
of every step's rules (the predictor's and the corrector's ``cx`` and ``coefs``, the solver's own rules at the
start): a solver's coefficients distilled for this model and step count, as in bespoke and S4S-style solver
learning; a scheduler carries them as ``learned_coefficients`` and ``Solver.step`` adds them to its rules.
"""
from __future__ import annotations

import math

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import torch

from fastsample.solver import COEFFICIENT_PARTS, check_coefficients
from fastsample.timesteps import check_scales

METHODS = ("dp", "gradient")
TIME_UNIT = 10.0  # model-time units per unit of a decoupled time offset parameter
COEF_UNIT = 0.1  # rule-value units per unit of a learned coefficient offset parameter


@dataclass
class LearnedSchedule:
    timesteps: list          # model timesteps, noisiest first (the first N levels)
    sigmas: list             # the N + 1 levels in the units of scheduler.sigmas (the last is the end point)
    solver: str              # the scheduler class it was fitted for
    nfe: int
    method: str
    train_loss: float        # the summed one-step cost on the fitting noise
    validation_error: float | None  # relative error of the end point against the teacher on held-out noise
    model_hash: str = ""
    extra: dict = field(default_factory=dict)
    scales: list | None = None  # per-step scales of the solver's prediction (method "gradient" with scales=True)
    coefficients: list | None = None  # per-step offsets of the solver's rules (method "gradient", coefficients=True)

    def save(self, path):
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> "LearnedSchedule":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a learned schedule (not JSON: {e})") from None
        fields = set(cls.__dataclass_fields__)
        required = {n for n, f in cls.__dataclass_fields__.items() if f.default is MISSING
                    and f.default_factory is MISSING}
        if not isinstance(d, dict) or not required <= set(d) or not set(d) <= fields:
            keys = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{path} is not a learned schedule: it needs the keys {sorted(required)} (and may have "
                             f"{sorted(fields - required)}), got {keys}")
        s = cls(**d)
        try:
            s.check()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return s

    def check(self):
        t = self.timesteps
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or self.nfe < 1:
            raise ValueError(f"nfe must be a positive integer, got {self.nfe!r}")
        for name in ("timesteps", "sigmas", "scales"):
            values = getattr(self, name)
            if values is None and name == "scales":
                continue
            if not isinstance(values, (list, tuple)) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be a list of finite numbers, got {values!r}")
        for name, kinds in (("solver", str), ("method", str), ("model_hash", str), ("extra", dict)):
            if not isinstance(getattr(self, name), kinds):
                raise ValueError(f"{name} must be a {kinds.__name__}, got {getattr(self, name)!r}")
        if len(t) != self.nfe or len(self.sigmas) != self.nfe + 1:
            raise ValueError(f"a schedule for {self.nfe} NFE needs {self.nfe} timesteps and {self.nfe + 1} sigmas, "
                             f"got {len(t)} and {len(self.sigmas)}")
        if any(b >= a for a, b in zip(self.sigmas, self.sigmas[1:])) or min(self.sigmas) < 0:
            raise ValueError(f"sigmas must be non-negative and strictly decreasing, got {self.sigmas}")
        if self.scales is not None and len(self.scales) != self.nfe:
            raise ValueError(f"a schedule for {self.nfe} NFE needs {self.nfe} scales, got {len(self.scales)}")
        if self.scales is not None:
            check_scales(self.scales, self.nfe, "scales")
        if min(t) < 0:
            raise ValueError(f"timesteps (model times) must be non-negative, got {t}")
        if self.coefficients is not None:
            check_coefficients(self.coefficients, self.nfe, "coefficients")

    def apply(self, scheduler, model=None):
        """``scheduler.set_timesteps`` with this schedule; warns when ``model``'s weights differ from the fitted one."""
        if model is not None and self.model_hash and model_hash(model) != self.model_hash:
            import warnings

            warnings.warn("this schedule was learned for another model (weights hash mismatch)", stacklevel=2)
        if type(scheduler).__name__ != self.solver:
            import warnings

            warnings.warn(f"this schedule was learned for {self.solver}, not {type(scheduler).__name__}", stacklevel=2)
        for key, value in (("learned_scales", self.scales), ("learned_coefficients", self.coefficients)):
            if value is not None or scheduler.config.get(key) is not None:
                scheduler.register_to_config(**{key: None if value is None else list(value)})
        scheduler.set_timesteps(**self.grid_kwargs())
        return scheduler

    def grid_kwargs(self) -> dict:
        """The keywords of ``set_timesteps`` (and ``fastsample.sample``) for this schedule."""
        if self.decoupled:
            return {"sigmas": list(self.sigmas[:-1]), "timesteps": list(self.timesteps)}
        return {"timesteps": list(self.timesteps)}

    @property
    def decoupled(self) -> bool:
        """Model times fitted apart from the levels: a scheduler needs both (``learned_sigmas``)."""
        return bool(self.extra.get("decoupled_time"))

    def scheduler(self, base):
        """A copy of scheduler ``base`` that carries this schedule in its config (``learned_timesteps``), so a
        pipeline's ``set_timesteps(nfe)`` uses it and ``save_pretrained`` keeps it."""
        config = {k: v for k, v in base.config.items() if k != "_use_default_values"}  # else from_config drops it
        scales = None if self.scales is None else list(self.scales)
        sigmas = list(self.sigmas[:-1]) if self.decoupled else None
        coefficients = None if self.coefficients is None else list(self.coefficients)
        return type(base).from_config({**config, "learned_timesteps": list(self.timesteps), "learned_scales": scales,
                                       "learned_sigmas": sigmas, "learned_coefficients": coefficients,
                                       "fitted_model_hash": self.model_hash or None})


def modules_in(model, depth: int = 4) -> list:
    """The torch modules a model callable holds: the module itself, or those a wrapper reaches (a lambda's or
    closure's captured variables, a ``functools.partial``, a bound method's object, a wrapper object's attributes),
    outermost first and each once."""
    found, seen = [], set()

    def visit(obj, d):
        if id(obj) in seen or d < 0:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            found.append(obj)
            return
        if isinstance(obj, (list, tuple)):
            children = list(obj)
        elif isinstance(obj, dict):
            children = list(obj.values())
        elif callable(obj) or hasattr(obj, "__dict__"):
            children = [getattr(obj, "__self__", None), getattr(obj, "func", None), getattr(obj, "__wrapped__", None)]
            children += list(getattr(obj, "args", ()) or ()) if isinstance(getattr(obj, "args", None), tuple) else []
            children += [c.cell_contents for c in (getattr(obj, "__closure__", None) or ()) if _filled(c)]
            fn_globals = getattr(getattr(obj, "__code__", None), "co_names", ())
            children += [getattr(obj, "__globals__", {}).get(n) for n in fn_globals]
            if not isinstance(obj, type) and not hasattr(obj, "__code__"):
                children += list(getattr(obj, "__dict__", {}).values())
        else:
            return
        for c in children:
            if c is not None and not isinstance(c, (str, bytes, int, float, bool, type)) and not _is_module_obj(c):
                visit(c, d - 1)

    visit(model, depth)
    return found


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _is_module_obj(obj) -> bool:
    import types

    return isinstance(obj, types.ModuleType)


def model_hash(model) -> str:
    """A short hash of the weights a model callable holds: a torch module's, or those of the modules a wrapper
    (a lambda, a closure, classifier-free guidance) reaches (``modules_in``); "" when it holds none.  A module whose
    output is a fixed function of its weights can declare that function's revision as ``hash_salt`` (a string): a
    corrected conversion then no longer matches what was fitted or measured with the old one."""
    modules = modules_in(model)
    if not modules:
        return ""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        salt = getattr(module, "hash_salt", None)
        if salt is not None:
            h.update(f"{i}.salt={salt}".encode())
        for k, v in sorted(module.state_dict().items()):
            h.update(f"{i}.{k}".encode() if i else k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def learn_schedule(model, scheduler, noise: torch.Tensor, num_inference_steps: int, method: str = "dp",
                   fine_steps: int = 60, per_step: int = 4, validation_noise: torch.Tensor | None = None,
                   gradient_options: dict | None = None, **model_kwargs) -> LearnedSchedule:
    """Fit ``num_inference_steps`` levels for ``scheduler`` (configured for ``model``, whose output is the scheduler's
    ``prediction_type``) against a teacher from ``noise``; see the module docstring.  ``gradient_options`` (method
    "gradient"): ``iterations`` (200), ``lr`` (0.05), ``batch_size`` (10), ``ball`` (0.0), ``seed`` (0), ``scales``
    (False: True also fits one scale per step on the solver's prediction, carried as ``learned_scales``),
    ``eval_every`` (10: the fit keeps the best iterate on the whole fitting set, checked this often), ``target`` (the
    teacher's end points from ``noise``, when computed once for several fits; default: UniPC-3 with ``per_step``
    steps through each interval of the ``fine_steps`` grid), ``validation`` (``(noise, teacher end points)``: the best
    iterate is chosen on these instead of the fitting set; unconditional models only), ``decouple_time``
    (False: True fits the model's time at each level apart from the level, LD3's decoupled time;
    a scheduler then carries the levels too, as ``learned_sigmas``), ``coefficients`` (False: True also fits an
    offset of every value of every step's rules, the corrector's and the predictor's ``cx`` and ``coefs``, carried
    as ``learned_coefficients``)."""
    gradient_options = dict(gradient_options or {})
    if scheduler.config.get("learned_coefficients") is not None:
        raise ValueError("a schedule is fitted from the solver's own rules: the scheduler already carries "
                         "learned_coefficients (for another grid); start from a scheduler without them")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = num_inference_steps
    order = scheduler.config.get("solver_order", 1)
    if not isinstance(n, int) or n < max(2, order) or n >= fine_steps:
        raise ValueError(f"num_inference_steps must be an int in [max(2, solver_order={order}), fine_steps={fine_steps}), "
                         f"got {n!r}")
    if method == "gradient":
        with torch.enable_grad():
            return _learn_gradient(model, scheduler, noise, n, fine_steps, per_step, validation_noise, model_kwargs,
                                   **gradient_options)
    if gradient_options:
        raise ValueError(f"{sorted(gradient_options)} only apply to method='gradient'")
    return _learn_dp(model, scheduler, noise, n, fine_steps, per_step, validation_noise, model_kwargs)


def _learn_dp(model, scheduler, noise, n, fine_steps, per_step, validation_noise, model_kwargs) -> LearnedSchedule:
    """GITS-style dynamic programming: the n of the fine grid's levels whose first-order steps between the
    teacher's states cost least."""
    from fastsample.parameterization import convert
    from fastsample.sampling import model_output, reference_states

    scheduler.set_timesteps(fine_steps)
    grid, fine_t = scheduler.grid, scheduler.timesteps.tolist()
    xs = reference_states(model, noise, scheduler, per_step, **model_kwargs)
    m = grid.num_steps
    x0 = [convert(model_output(model(xs[i], scheduler.timesteps[i], **model_kwargs)), xs[i], scheduler.config.prediction_type,
                    grid.alpha[i], grid.sigma[i], "x0") for i in range(m)]
    cost = torch.full((m + 1, m + 1), float("inf"), dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m + 1):
            r = grid.sigma[j] / grid.sigma[i]
            step = r * xs[i] + (grid.alpha[j] - grid.alpha[i] * r) * x0[i]
            cost[i, j] = float((step - xs[j]).double().square().mean())
    best = torch.full((n + 1, m + 1), float("inf"), dtype=torch.float64)
    back = torch.zeros((n + 1, m + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, n + 1):
        total = best[k - 1][:, None] + cost          # from i (rows) to j (columns)
        best[k], back[k] = total.min(0)
    path, j = [m], m
    for k in range(n, 0, -1):
        j = int(back[k, j])
        path.append(j)
    path = path[::-1]
    levels = [float(scheduler.sigmas[i]) for i in path]
    timesteps = [fine_t[i] for i in path[:-1]]
    schedule = LearnedSchedule(timesteps, levels, type(scheduler).__name__, n, "dp", float(best[n, m]), None,
                               model_hash(model), {"fine_steps": fine_steps})
    if validation_noise is not None:
        schedule.validation_error = validation_error(model, scheduler, schedule, validation_noise, **model_kwargs)
    scheduler.set_timesteps(timesteps=timesteps)
    return schedule


@torch.no_grad()
def validation_error(model, scheduler, schedule: LearnedSchedule, noise: torch.Tensor, per_step: int = 20,
                     reference: torch.Tensor | None = None, **model_kwargs) -> float:
    """Relative error of ``scheduler`` on ``schedule`` against the teacher's end point, from ``noise``: by default
    ``per_step`` teacher steps through each of the schedule's intervals; or ``reference``, end points computed once
    over the same interval (e.g. on the fine grid) and shared by the schedules of every NFE."""
    from fastsample.sampling import reference_states, sample

    schedule.apply(scheduler)
    ref = reference if reference is not None else reference_states(model, noise, scheduler, per_step,
                                                                   **model_kwargs)[-1]
    x, _ = sample(model, noise, scheduler, progress=False, **schedule.grid_kwargs(), **model_kwargs)
    return float((x - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------------ method="gradient"
class _GridValues(torch.autograd.Function):
    """values = fn(lams) (float64 vectors) with the Jacobian by central differences: any float function of the grid
    (the solver's coefficients, the conversions, the model times) becomes differentiable."""

    @staticmethod
    def forward(ctx, lams, fn, h):
        base = torch.tensor(fn(lams.tolist()), dtype=torch.float64)
        jac = torch.empty(len(base), len(lams), dtype=torch.float64)
        for k in range(len(lams)):
            up, down = lams.tolist(), lams.tolist()
            step = h * max(1.0, abs(up[k]))
            up[k] += step
            down[k] -= step
            jac[:, k] = (torch.tensor(fn(up), dtype=torch.float64) - torch.tensor(fn(down), dtype=torch.float64)) / (2 * step)
        ctx.save_for_backward(jac)
        return base

    @staticmethod
    def backward(ctx, grad):
        (jac,) = ctx.saved_tensors
        return grad @ jac, None, None


class _Program:
    """The fixed shape of an N-step solve (which steps correct, each step's order, the history kept) and the float
    values that a grid puts into it: per step the model time, the conversion (cx, co), the corrector's (cx, coefs)
    where it corrects, and the predictor's (cx, coefs)."""

    def __init__(self, scheduler, grid):
        from fastsample.solver import Grid

        solver = scheduler.solver
        if scheduler.prediction_transforms(grid.num_steps) or solver.stochastic:
            raise ValueError(f"method='gradient' needs a deterministic solver without prediction transforms (DualFast, "
                             f"DC ratios), got {type(scheduler).__name__}")
        if grid.alpha[0] == 0.0 and solver.prediction == "eps":
            raise ValueError(f"method='gradient' on a grid that starts at pure noise (a flow schedule's sigma = 1) needs "
                             f"a data-prediction solver (UniPC, DPM-Solver++): {type(scheduler).__name__} predicts the "
                             f"noise, which the model does not give there (the scheduler takes that step exactly "
                             f"through the data prediction instead)")
        self.solver, self.schedule, self.Grid = solver, scheduler.schedule, Grid
        self.prediction_type = scheduler.config.prediction_type
        self.model_time = scheduler.model_time
        # VE levels of the fixed ends; a flow grid's first level (sigma = 1, alpha = 0) is VE level inf
        self.start = grid.sigma[0] / grid.alpha[0] if grid.alpha[0] > 0 else float("inf")
        self.end = grid.sigma[-1] / grid.alpha[-1]
        self.keep = solver.solver_order + (1 if solver.has_corrector else 0)
        self.n = grid.num_steps
        self.steps, prev = [], None  # per step: (corrector order or None, predictor order, #coefs of each)
        for i in range(self.n):
            corr = None
            if prev is not None and solver.uses_corrector(grid, i) and solver.corrector_rule(grid, i, prev) is not None:
                corr = prev
            k = solver.step_order(grid, i, solver.usable(grid, i, min(i, self.keep) + 1))
            n_corr = len(solver.corrector_rule(grid, i, corr).coefs) if corr is not None else 0
            self.steps.append((corr, k, n_corr, len(solver.rule(grid, i, k).coefs)))
            prev = k
        # where each rule's values (cx, then its coefs) sit in ``values``: the slots learned offsets go to
        self.slots, pos = [], 0
        for corr, _, n_corr, n_pred in self.steps:
            pos += 3  # the model time and the conversion (cx, co)
            corrector = list(range(pos, pos + 1 + n_corr)) if corr is not None else []
            pos += len(corrector)
            self.slots.append({"predictor": list(range(pos, pos + 1 + n_pred)), "corrector": corrector})
            pos += 1 + n_pred
        self.slot_index = torch.tensor([j for st in self.slots for part in COEFFICIENT_PARTS for j in st[part]])

    def coefficients(self, flat) -> list:
        """Offsets over ``slot_index`` (a flat vector) as the per-step ``{"predictor": ..., "corrector": ...}`` entries
        a scheduler carries (``learned_coefficients``)."""
        values = iter(float(v) for v in flat)
        return [{part: [next(values) for _ in st[part]] for part in COEFFICIENT_PARTS} for st in self.slots]

    def grid(self, inner_lams):
        import math

        levels = [self.start] + [math.exp(-v) for v in inner_lams] + [self.end]
        return self.Grid.from_sigma_ve(self.schedule, levels)

    def values(self, inner_lams) -> list:
        from fastsample.parameterization import eps_coefficients, x0_coefficients

        g = self.grid(inner_lams)
        conv = x0_coefficients if self.solver.prediction == "x0" else eps_coefficients
        mt = self.model_time(g)
        out = []
        for i, (corr, k, _, _) in enumerate(self.steps):
            out += [mt(i), *conv(self.prediction_type, g.alpha[i], g.sigma[i])]
            if corr is not None:
                rule = self.solver.corrector_rule(g, i, corr)
                out += [rule.cx, *rule.coefs]
            rule = self.solver.rule(g, i, k)
            if rule.noise:
                raise ValueError("method='gradient' needs a deterministic solver step")
            out += [rule.cx, *rule.coefs]
        return out

    def run(self, model, x, vals, scales=None, time_offsets=None, coefficient_offsets=None, **model_kwargs):
        """The differentiable N-step solve from x with the values ``vals`` (a tensor from ``_GridValues``),
        optional per-step scales of the prediction, optional offsets of the model's time (decoupled time) and
        optional offsets of the rules' values (over ``slot_index``)."""
        from fastsample.sampling import model_output

        if coefficient_offsets is not None:
            vals = vals.index_add(0, self.slot_index, coefficient_offsets.to(vals.dtype))
        vals = vals.to(x.dtype)
        pos, hist, last_x = 0, [], None

        def take(m):
            nonlocal pos
            v = vals[pos:pos + m]
            pos += m
            return v

        for i, (corr, k, n_corr, n_pred) in enumerate(self.steps):
            t, cx, co = take(3)
            if time_offsets is not None:
                t = t + time_offsets[i].to(t.dtype)
            out = model_output(model(x, t, **model_kwargs))
            pred = cx * x + co * out
            hist = [pred if scales is None else pred * scales[i].to(x.dtype)] + hist
            if corr is not None:
                c = take(1 + n_corr)
                x = c[0] * last_x + sum(c[j + 1] * hist[j] for j in range(n_corr))
            c = take(1 + n_pred)
            x_next = c[0] * x + sum(c[j + 1] * hist[j] for j in range(n_pred))
            last_x, hist, x = x, hist[:self.keep], x_next
        return x


LR_SCHEDULES = ("constant", "cosine")


def _check_gradient_options(iterations, eval_every, ball, lr_schedule="constant"):
    import math

    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if not (isinstance(eval_every, int) and eval_every >= 1):
        raise ValueError(f"eval_every must be a positive integer, got {eval_every!r}")
    if not (ball >= 0 and math.isfinite(ball)):
        raise ValueError(f"ball must be a finite number >= 0, got {ball!r}")


def _gradient_target(model, scheduler, noise, fine_steps, per_step, model_kwargs, target, teleported):
    """The teacher's end points from ``noise``: ``target`` checked, or UniPC-3-style reference states on the fine
    grid."""
    from fastsample.sampling import reference_states

    if target is None:
        if teleported:
            raise ValueError("a teleporting scheduler needs target= (the converged end points of the full solve from "
                             "noise): the default teacher would start where the teleportation lands")
        scheduler.set_timesteps(fine_steps)
        with torch.no_grad():
            return reference_states(model, noise, scheduler, per_step, **model_kwargs)[-1]
    if not (torch.is_tensor(target) and target.shape == noise.shape and bool(torch.isfinite(target).all())):
        raise ValueError(f"target must be the teacher's finite end points from noise, of shape {tuple(noise.shape)}, "
                         f"got {tuple(target.shape) if torch.is_tensor(target) else type(target).__name__}")
    return target


def _level_range(scheduler, lam) -> tuple[float, float]:
    """(lo, cap): the lambdas between which a grid's inner levels lie.  The cap is the last level when it is finite,
    else the trained range's end (a flow schedule's t_min = 0 is clean data: no cap there); a flow grid's first level
    is pure noise (lambda = -inf), and there the levels lie below the level one training step short of it."""
    import math

    if math.isfinite(lam[-1]):
        cap = lam[-1]
    else:
        t_min = torch.tensor(scheduler.schedule.t_min, dtype=torch.float64)
        end = float(scheduler.schedule.lam(t_min))
        cap = max([v for v in lam if math.isfinite(v)] + ([end] if math.isfinite(end) else []))
    lo = lam[0]
    if not math.isfinite(lo):
        top = 1.0 - 1.0 / scheduler.config.num_train_timesteps
        lo = min(float(scheduler.schedule.lam(torch.tensor(top, dtype=torch.float64))), lam[1] - 1e-3)
    return lo, cap


class _GradientFit:
    """The parameters of an LD3-style fit on a scheduler's grid: softmax weights ``theta`` of the inner levels'
    gaps, the start-noise relaxation ``delta``, per-step ``log_scales`` and model-time ``offsets``."""

    def __init__(self, model, scheduler, noise, n, target, model_kwargs, scales, decouple_time, validation,
                 coefficients=False):
        self.model, self.target, self.model_kwargs = model, target, model_kwargs
        self.scales, self.decouple_time, self.fit_coefficients = scales, decouple_time, coefficients
        self.teleported = getattr(scheduler, "teleport_origin", None) is not None
        grid = scheduler.grid  # with teleportation: the m = n - k steps left after the closed-form jump
        self.m, self.lam = grid.num_steps, list(grid.lam)
        self.lo, self.cap = _level_range(scheduler, self.lam)
        self.program = _Program(scheduler, grid)
        gaps = torch.tensor([b - a for a, b in zip([self.lo] + self.lam[1:-1], self.lam[1:-1] + [self.cap])],
                            dtype=torch.float64).clamp_min(1e-3)
        self.theta = torch.log(gaps / gaps.sum()).clone().requires_grad_(True)
        start = scheduler.prepare_latents if self.teleported else lambda z, _: z * scheduler.init_noise_sigma
        self.x_T = start(noise, n)
        self.delta = torch.zeros_like(self.x_T, requires_grad=True)
        self.log_scales = torch.zeros(self.m, dtype=torch.float64, requires_grad=scales)
        # decoupled model time: offsets of TIME_UNIT model-time units per unit of the parameter (so lr suits both)
        self.offsets = torch.zeros(self.m, dtype=torch.float64, requires_grad=decouple_time)
        # offsets of the rules' values: COEF_UNIT rule units per unit of the parameter
        self.coefs = torch.zeros(len(self.program.slot_index), dtype=torch.float64, requires_grad=coefficients)
        self.validation = None
        if validation is not None:  # (noise, the teacher's end points from it): the iterate is chosen on these
            val_noise, val_target = validation
            if not (torch.is_tensor(val_noise) and torch.is_tensor(val_target) and val_noise.shape == val_target.shape
                    and val_noise.shape[1:] == noise.shape[1:]):
                raise ValueError("validation must be (noise, the teacher's end points from it), two tensors shaped "
                                 "like the fitting noise")
            self.validation = (start(val_noise, n), val_target)

    def params(self, ball: float) -> list:
        return ([self.theta] + ([self.delta] if ball > 0 else []) + ([self.log_scales] if self.scales else [])
                + ([self.offsets] if self.decouple_time else []) + ([self.coefs] if self.fit_coefficients else []))

    def inner(self):  # no step shorter than 1e-6 of the span, so a wild iterate cannot make a zero-length step
        w = torch.softmax(self.theta, 0).clamp_min(1e-6)
        frac = torch.cumsum(w / w.sum(), 0)[:-1]
        return self.lo + (self.cap - self.lo) * frac

    def run(self, start, **model_kwargs):
        vals = _GridValues.apply(self.inner(), self.program.values, 1e-6)
        return self.program.run(self.model, start, vals, self.log_scales.exp() if self.scales else None,
                                TIME_UNIT * self.offsets if self.decouple_time else None,
                                COEF_UNIT * self.coefs if self.fit_coefficients else None, **model_kwargs)

    def full_loss(self, on_validation: bool) -> float:  # every latent, without the ball's perturbation
        start, goal = self.validation if on_validation else (self.x_T, self.target)
        with torch.no_grad():
            x = self.run(start, **({} if on_validation else self.model_kwargs))
            return float((x - goal).double().square().mean())

    def snapshot(self) -> tuple:
        return tuple(v.detach().clone() for v in (self.theta, self.log_scales, self.offsets, self.coefs))

    def restore(self, snapshot) -> None:
        with torch.no_grad():
            for param, value in zip((self.theta, self.log_scales, self.offsets, self.coefs), snapshot):
                param.copy_(value)

    def batch_loss(self, idx, ball: float):
        start = self.x_T[idx] + (self.delta[idx] if ball > 0 else 0)
        kw = {k: (v[idx] if torch.is_tensor(v) and v.ndim and len(v) == len(self.x_T) else v)
              for k, v in self.model_kwargs.items()}
        return (self.run(start, **kw) - self.target[idx]).double().square().mean()

    def project_ball(self, ball: float) -> None:
        with torch.no_grad():
            limit = ball * self.x_T.flatten(1).norm(dim=1)
            norm = self.delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            self.delta.mul_((limit / norm).clamp(max=1.0).view(-1, *[1] * (self.delta.ndim - 1)))


def _learn_gradient(model, scheduler, noise, n, fine_steps, per_step, validation_noise, model_kwargs,
                    iterations: int = 200, lr: float = 0.05, batch_size: int = 10, ball: float = 0.0,
                    seed: int = 0, scales: bool = False, decouple_time: bool = False,
                    eval_every: int = 10, target: torch.Tensor | None = None,
                    validation: tuple | None = None, coefficients: bool = False,
                    lr_schedule: str = "constant") -> LearnedSchedule:
    _check_gradient_options(iterations, eval_every, ball, lr_schedule)
    scheduler.set_timesteps(n)
    teleported = getattr(scheduler, "teleport_origin", None) is not None
    target = _gradient_target(model, scheduler, noise, fine_steps, per_step, model_kwargs, target, teleported)
    scheduler.set_timesteps(n)
    fit = _GradientFit(model, scheduler, noise, n, target, model_kwargs, scales, decouple_time, validation,
                       coefficients)
    opt = torch.optim.Adam(fit.params(ball), lr=lr)
    # "cosine": the step size falls from lr to 0 over the iterations, so the last iterates settle instead of
    # wandering at Adam's constant step (which leaves the pick of the best iterate to the noise of the checks)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / iterations))) \
        if lr_schedule == "cosine" else None
    g = torch.Generator().manual_seed(seed)
    # the fit returns the best iterate on the whole fitting set (or on ``validation``, which guards against fitting
    # the fitting set's outliers), checked every ``eval_every`` iterations; the first check is the starting grid, so
    # the fit can never leave it worse than where it started on that set
    on_validation = validation is not None
    losses, best = [], (fit.full_loss(on_validation), fit.snapshot(), 0)
    initial_loss = fit.full_loss(False)  # on the fitting set
    for it in range(iterations):
        loss = fit.batch_loss(torch.randperm(len(noise), generator=g)[:batch_size], ball)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if decay is not None:
            decay.step()
        if ball > 0:
            fit.project_ball(ball)
        losses.append(loss.item())
        if (it + 1) % eval_every == 0 or it + 1 == iterations:
            current = fit.full_loss(on_validation)
            if current < best[0]:
                best = (current, fit.snapshot(), it + 1)
    fit.restore(best[1])
    extra = {"iterations": iterations, "lr": lr, "lr_schedule": lr_schedule, "ball": ball, "first_loss": losses[0],
             "fine_steps": fine_steps,
             "best_iteration": best[2], "initial_loss": initial_loss,
             "selected_on": "validation" if on_validation else "fit", "selection_loss": best[0],
             "decoupled_time": decouple_time, "coefficients": coefficients, "teleported_steps": n - fit.m,
             "teleport_fraction": scheduler.config.get("teleport_fraction") if teleported else None}
    schedule = _fitted_schedule(fit, scheduler, n, extra)
    if validation_noise is not None and not teleported:
        schedule.validation_error = validation_error(model, scheduler, schedule, validation_noise, **model_kwargs)
    scheduler.set_timesteps(**schedule.grid_kwargs())
    return schedule


def _fitted_schedule(fit: _GradientFit, scheduler, n: int, extra: dict) -> LearnedSchedule:
    """The fit's current parameters as a LearnedSchedule over all n steps (a teleporting scheduler's k teleported
    levels as they were, then the fitted ones)."""
    import math

    with torch.no_grad():
        lams = [fit.lam[0]] + fit.inner().tolist()
        levels = [math.exp(-v) for v in lams] + [fit.program.end]
        fitted = fit.program.grid(lams[1:])
        times = [float(fit.program.model_time(fitted)(i)) + TIME_UNIT * float(fit.offsets[i]) for i in range(fit.m)]
        x = fit.run(fit.x_T, **fit.model_kwargs)
        train_loss = float((x - fit.target).double().square().mean())
    sigmas, fitted_scales = _scheduler_units(scheduler, levels), fit.log_scales.exp().tolist() if fit.scales else None
    coefficients = fit.program.coefficients(COEF_UNIT * fit.coefs.detach()) if fit.fit_coefficients else None
    if fit.teleported:
        plain = type(scheduler).from_config({**scheduler.config, "teleport_fraction": 0.0, "teleport_sigma": None})
        plain.set_timesteps(n)
        k = n - fit.m
        times, sigmas = [float(v) for v in plain.timesteps[:k]] + times, [float(v) for v in plain.sigmas[:k]] + sigmas
        fitted_scales = None if fitted_scales is None else [1.0] * k + fitted_scales
        coefficients = None if coefficients is None else [{"predictor": [], "corrector": []}] * k + coefficients
    return LearnedSchedule(times, sigmas, type(scheduler).__name__, n, "gradient", train_loss, None,
                           model_hash(fit.model), extra, fitted_scales, coefficients)


def _scheduler_units(scheduler, levels_ve) -> list:
    """VE sigmas -> the units of ``scheduler.sigmas`` (VE sigma for VP models, t for flow models)."""
    if scheduler.flow is None:
        return [float(v) for v in levels_ve]
    return [1.0 if math.isinf(v) else float(v / (1 + v)) for v in levels_ve]  # VE inf: the flow's pure noise
