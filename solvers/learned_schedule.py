"""Learned time schedules: the steps of any fastsample solver fitted to a model against a many-step teacher.

``method="dp"`` is GITS-style (ICML 2024): on a fine grid of M levels (the scheduler's own M-step grid, so every
candidate is a level the scheduler can take), the teacher's trajectory is computed once, with the model's data
prediction at every fine level; the cost of one step from fine level i to j is the mean squared distance between a
first-order (DDIM) step from the teacher's state at i and the teacher's state at j; dynamic programming picks the N
steps from the first to the last level with the least total cost.  Seconds, no gradients.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

METHODS = ("dp",)


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

    def save(self, path):
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> "LearnedSchedule":
        d = json.loads(Path(path).read_text())
        s = cls(**d)
        s.check()
        return s

    def check(self):
        t = self.timesteps
        if len(t) != self.nfe or len(self.sigmas) != self.nfe + 1:
            raise ValueError(f"a schedule for {self.nfe} NFE needs {self.nfe} timesteps and {self.nfe + 1} sigmas, "
                             f"got {len(t)} and {len(self.sigmas)}")
        if any(b >= a for a, b in zip(self.sigmas, self.sigmas[1:])) or min(self.sigmas) < 0:
            raise ValueError(f"sigmas must be non-negative and strictly decreasing, got {self.sigmas}")

    def apply(self, scheduler, model=None):
        """``scheduler.set_timesteps`` with this schedule; warns when ``model``'s weights differ from the fitted one."""
        if model is not None and self.model_hash and model_hash(model) != self.model_hash:
            import warnings

            warnings.warn("this schedule was learned for another model (weights hash mismatch)", stacklevel=2)
        if type(scheduler).__name__ != self.solver:
            import warnings

            warnings.warn(f"this schedule was learned for {self.solver}, not {type(scheduler).__name__}", stacklevel=2)
        scheduler.set_timesteps(timesteps=self.timesteps)
        return scheduler

    def scheduler(self, base):
        """A copy of scheduler ``base`` that carries this schedule in its config (``learned_timesteps``), so a
        pipeline's ``set_timesteps(nfe)`` uses it and ``save_pretrained`` keeps it."""
        config = {k: v for k, v in base.config.items() if k != "_use_default_values"}  # else from_config drops it
        return type(base).from_config({**config, "learned_timesteps": list(self.timesteps)})


def model_hash(model) -> str:
    """A short hash of a torch module's weights ("" for a plain callable)."""
    if not isinstance(model, torch.nn.Module):
        return ""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def learn_schedule(model, scheduler, noise: torch.Tensor, num_inference_steps: int, method: str = "dp",
                   fine_steps: int = 60, per_step: int = 4, validation_noise: torch.Tensor | None = None,
                   **model_kwargs) -> LearnedSchedule:
    """Fit ``num_inference_steps`` levels for ``scheduler`` (configured for ``model``, whose output is the scheduler's
    ``prediction_type``) against a teacher from ``noise``; see the module docstring."""
    from fastsample import parameterization as P
    from fastsample.sampling import _output, reference_states

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = num_inference_steps
    order = scheduler.config.get("solver_order", 1)
    if not isinstance(n, int) or n < max(2, order) or n >= fine_steps:
        raise ValueError(f"num_inference_steps must be an int in [max(2, solver_order={order}), fine_steps={fine_steps}), "
                         f"got {n!r}")
    scheduler.set_timesteps(fine_steps)
    grid, fine_t = scheduler._grid, scheduler.timesteps.tolist()
    xs = reference_states(model, noise, scheduler, per_step, **model_kwargs)
    m = grid.num_steps
    x0 = [P.convert(_output(model(xs[i], scheduler.timesteps[i], **model_kwargs)), xs[i], scheduler.config.prediction_type,
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
    schedule = LearnedSchedule(timesteps, levels, type(scheduler).__name__, n, method, float(best[n, m]), None,
                               model_hash(model), {"fine_steps": fine_steps})
    if validation_noise is not None:
        schedule.validation_error = validation_error(model, scheduler, schedule, validation_noise, **model_kwargs)
    scheduler.set_timesteps(timesteps=timesteps)
    return schedule


@torch.no_grad()
def validation_error(model, scheduler, schedule: LearnedSchedule, noise: torch.Tensor, per_step: int = 20,
                     **model_kwargs) -> float:
    """Relative error of ``scheduler`` on ``schedule`` against the teacher's end point, from ``noise``."""
    from fastsample.sampling import reference_states, sample

    schedule.apply(scheduler)
    ref = reference_states(model, noise, scheduler, per_step, **model_kwargs)[-1]
    x, _ = sample(model, noise, scheduler, timesteps=schedule.timesteps, progress=False, **model_kwargs)
    return float((x - ref).norm() / ref.norm())
