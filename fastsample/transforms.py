"""Prediction transforms: per-run changes of the predictions a solver consumes, applied in a declared order.

A transform is an object with a ``stage`` and ``__call__(grid, i, x, hist, memo) -> (hist, memo)``.  ``hist`` is the
solver's history with the new prediction first (in the solver's own prediction, x0 or eps), ``x`` the sample at node
``i`` and ``memo`` the transform's own per-run memory (``start()`` gives its first value; it lives in the solver's
``State``, so nothing is kept on a shared solver or scheduler).  What a transform returns is what the solver uses and
keeps.  The two stages, in the order ``Solver.step`` applies them:

- ``"prediction"``: the new prediction as it arrives, before the corrector (DualFast);
- ``"history"``: after the corrector, before the predictor (DC-Solver's dynamic compensation).

Thresholding (in the conversion to x0) and learned per-step scales come before both, where the scheduler converts
the model's output.  A run's transforms are given to ``Solver.init(grid, transforms)``.
"""
from __future__ import annotations

import math

from .parameterization import convert

STAGES = ("prediction", "history")
DUALFAST_REFERENCES = ("first", "previous")
DUALFAST_SCHEDULES = ("constant", "linear")
DUALFAST_MAX = 2.0
DUALFAST_DEFAULTS = {"reference": "previous", "schedule": "constant"}


class Transform:
    stage = "prediction"

    def start(self):
        return None

    def __call__(self, grid, i: int, x, hist: tuple, memo):
        raise NotImplementedError


def check_transforms(transforms) -> tuple:
    transforms = tuple(transforms)
    for t in transforms:
        if getattr(t, "stage", None) not in STAGES or not callable(t):
            raise ValueError(f"a prediction transform needs a stage in {STAGES} and a __call__, got {t!r}")
    return transforms


def apply(stage: str, transforms: tuple, memos: tuple, grid, i: int, x, hist: tuple):
    """The transforms of ``stage`` in order; returns (hist, memos)."""
    if not transforms:
        return hist, memos
    memos = list(memos)
    for k, t in enumerate(transforms):
        if t.stage == stage:
            hist, memos[k] = t(grid, i, x, hist, memos[k])
    return hist, tuple(memos)


class DualFast(Transform):
    """DualFast's prediction (arXiv 2506.13058): eps~_i = (1 + c_i) eps(x_i, t_i) - c_i eps(x_tau, t_tau), no extra
    model call.  ``eps(x_tau, t_tau)`` is a buffered model prediction at a higher noise level: the previous step's
    (``reference="previous"``, the default) or the run's first (``"first"``), always the model's own, never a mixed
    one.  The mix
    is taken in the noise prediction at the current sample, whatever the solver consumes (a data-prediction solver
    gets x0~ = (x_i - sigma_i eps~_i) / alpha_i), and the solver uses and keeps the mixed prediction, so its
    higher-order terms see one consistent, changed field.  ``c_i = c`` (``schedule="constant"``) or ``c (1 - i / N)``
    (``"linear"``, falling to 0 at the last step).  A node at pure noise (alpha = 0) is left as it is."""

    stage = "prediction"

    def __init__(self, c: float, prediction: str, reference: str = "previous", schedule: str = "constant"):
        self.c, self.prediction = check_dualfast(c, reference, schedule), prediction
        self.reference, self.schedule = reference, schedule

    def coefficient(self, i: int, n: int) -> float:
        return self.c if self.schedule == "constant" else self.c * (1.0 - i / n)

    def __call__(self, grid, i, x, hist, memo):
        a, s = grid.alpha[i], grid.sigma[i]
        if a == 0.0 or s == 0.0:  # pure noise (eps = x / sigma exactly) or clean data: nothing to mix
            return hist, memo
        eps = convert(hist[0], x, "sample" if self.prediction == "x0" else "epsilon", a, s, "eps")
        if memo is None:  # the reference is this prediction: c (eps - eps_tau) = 0
            return hist, eps
        c = self.coefficient(i, grid.num_steps)
        mixed = eps + c * (eps - memo)
        new_memo = memo if self.reference == "first" else eps
        return (convert(mixed, x, "epsilon", a, s, self.prediction),) + hist[1:], new_memo


def check_dualfast(c, reference: str = "previous", schedule: str = "constant") -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and 0 <= c <= DUALFAST_MAX):
        raise ValueError(f"dualfast must be a mixing coefficient c in [0, {DUALFAST_MAX}] (0: off), got {c!r}")
    if reference not in DUALFAST_REFERENCES:
        raise ValueError(f"dualfast_reference must be one of {DUALFAST_REFERENCES}, got {reference!r}")
    if schedule not in DUALFAST_SCHEDULES:
        raise ValueError(f"dualfast_schedule must be one of {DUALFAST_SCHEDULES}, got {schedule!r}")
    return float(c)


def dualfast_spec(value) -> dict | None:
    """A scheduler config's ``dualfast`` as DualFast's keywords, or None when off: a coefficient c (0 or None: off)
    or a dict with ``c`` and optionally ``reference`` and ``schedule``."""
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = set(value) - {"c", "reference", "schedule"}
        if unknown or "c" not in value:
            raise ValueError(f"dualfast as a dict takes 'c' (required), 'reference' and 'schedule', got {value!r}")
        spec = {**DUALFAST_DEFAULTS, **value}
    else:
        spec = {**DUALFAST_DEFAULTS, "c": value}
    check_dualfast(spec["c"], spec["reference"], spec["schedule"])
    return None if spec["c"] == 0 else spec
