"""Few-step samplers for discrete diffusion (masked and uniform corruption), their learnable per-step coefficients,
Learnable Sampler Distillation (LSD, LSD+) fitting them, and exact measures on the discrete testbed.

Conventions.  Tokens take values 0..V-1; under masking (absorbing) corruption the mask token is ``V``.  A *keep
level* ``alpha`` in [0, 1] is the probability that a clean token survives corruption (0: pure noise, 1: clean), so
a run climbs from 0 to 1.  A denoiser is a callable ``denoiser(x, alpha) -> N x L x V`` of probabilities of the
clean token at every position (``alpha`` a Python float, or a 0-d tensor when a fit differentiates through it).

One step from keep level a to b > a samples every position independently from the analytic posterior
q(x_b | x_a) = sum_v p(x0 = v | x_a) q(x_b | x_a, x0 = v) (:func:`transition`):
- masked: a masked token unmasks with probability (b - a) / (1 - a), its value drawn from p; kept tokens stay;
- uniform (D3PM's uniform kernel, diffusers' ``DiscreteDDIMScheduler``): with s = a / b and w_v = p_v / q(x_a | v),
  q(x_b = j | x_a) = (s [x_a = j] + (1 - s) / V) (b w_j + (1 - b) / V sum_v w_v).
Tokens moved in the same step are drawn independently: that factorisation is the few-step sampler's error, and it
vanishes as the steps get finer.

The per-step coefficients (:class:`DiscreteCoefficients`) are what LSD learns: a temperature for each step, which
divides the denoiser's log-probabilities before the step (1: the plain sampler), and, for LSD+, the keep levels
themselves (the time schedule).  All at their identity values they give the plain sampler exactly.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

SCHEDULES = ("linear", "cosine")
CORRUPTIONS = ("mask", "uniform")
F64 = torch.float64


def keep_levels(steps: int, schedule: str = "linear") -> torch.Tensor:
    """steps + 1 keep levels from 0 (pure noise) to 1 (clean): linear, or cosine (1 - cos(pi u / 2))."""
    _check_steps(steps)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=F64)
    return u if schedule == "linear" else 1.0 - torch.cos(math.pi * u / 2)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def _check_corruption(corruption) -> str:
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    return corruption


@dataclass(frozen=True)
class DiscreteCoefficients:
    """A few-step discrete sampler's per-step coefficients: ``levels`` (steps + 1 keep levels rising strictly from
    0 to 1) and ``temperatures`` (steps finite numbers > 0; 1 is the plain sampler), for ``corruption``."""
    levels: tuple
    temperatures: tuple
    corruption: str = "mask"
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        levels = tuple(float(a) for a in self.levels)
        temps = tuple(float(t) for t in self.temperatures)
        _check_corruption(self.corruption)
        if len(levels) < 2:
            raise ValueError(f"levels must hold steps + 1 >= 2 keep levels, got {list(levels)}")
        if not all(math.isfinite(a) for a in levels) or levels[0] != 0.0 or levels[-1] != 1.0 or \
                any(b <= a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"levels must be finite and rise strictly from 0.0 to 1.0, got {list(levels)}")
        if len(temps) != len(levels) - 1 or not all(math.isfinite(t) and t > 0 for t in temps):
            raise ValueError(f"temperatures must be {len(levels) - 1} finite numbers > 0 (1: the plain sampler), "
                             f"got {list(temps)}")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "temperatures", temps)

    @property
    def steps(self) -> int:
        return len(self.temperatures)

    @classmethod
    def plain(cls, steps: int, corruption: str = "mask", schedule: str = "linear") -> "DiscreteCoefficients":
        """The identity coefficients: the plain analytic-posterior sampler on a linear or cosine grid."""
        return cls(tuple(keep_levels(steps, schedule).tolist()), (1.0,) * steps, corruption)

    def to_dict(self) -> dict:
        return {"corruption": self.corruption, "levels": list(self.levels), "temperatures": list(self.temperatures),
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict) -> "DiscreteCoefficients":
        missing = {"levels", "temperatures", "corruption"} - set(d)
        if missing:
            raise ValueError(f"discrete coefficients need the keys levels, temperatures and corruption; "
                             f"missing {sorted(missing)}")
        return cls(tuple(d["levels"]), tuple(d["temperatures"]), d["corruption"], dict(d.get("meta", {})))

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path) -> "DiscreteCoefficients":
        with open(path) as f:
            return cls.from_dict(json.load(f))


# ------------------------------------------------------------------------------------------------ one step
def temper(probs: torch.Tensor, temperature) -> torch.Tensor:
    """probs ** (1 / temperature), renormalised over the last axis (temperature 1 returns ``probs`` itself)."""
    if not torch.is_tensor(temperature) and temperature == 1.0:
        return probs
    return torch.softmax(torch.log(probs.clamp_min(1e-300)) / temperature, dim=-1)


def transition(probs: torch.Tensor, x: torch.Tensor, a, b, corruption: str) -> torch.Tensor:
    """The analytic-posterior step's distribution of every position's next token, from keep level ``a`` to
    ``b > a``, given the clean-token probabilities ``probs`` (N x L x V) at the current tokens ``x`` (N x L).
    Masked: N x L x (V + 1), the last column the mask; uniform: N x L x V.  ``a`` and ``b`` may be 0-d tensors
    (differentiable)."""
    V = probs.shape[-1]
    if corruption == "mask":
        masked = (x == V).unsqueeze(-1)
        p_unmask = (b - a) / (1 - a)
        go = torch.cat([p_unmask * probs, (1 - p_unmask) * torch.ones_like(probs[..., :1])], dim=-1)
        stay = torch.nn.functional.one_hot(x, V + 1).to(probs.dtype)
        return torch.where(masked, go, stay)
    if corruption != "uniform":
        _check_corruption(corruption)
    hit = torch.nn.functional.one_hot(x, V).to(probs.dtype)
    w = probs / (a * hit + (1 - a) / V)
    s = a / b
    return (s * hit + (1 - s) / V) * (b * w + (1 - b) / V * w.sum(-1, keepdim=True))


def _draw(probs: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: the index where the cumulative probabilities pass the uniforms ``r`` (N x L)."""
    cdf = probs.cumsum(-1)
    return (cdf < (r * cdf[..., -1]).unsqueeze(-1)).sum(-1).clamp_max(probs.shape[-1] - 1)


@dataclass
class DiscreteNoise:
    """A run's randomness, shared by a student and its teacher ("the same noise").  Masked: ``order`` (N x L
    uniforms: a position unmasks at the first level above its value, so every sampler unmasks in the same order)
    and ``values`` (N x L uniforms for the inverse-CDF draw of each position's one value).  Uniform: ``start``
    (the N x L starting tokens) and ``seed`` (for the per-step uniforms)."""
    corruption: str
    shape: tuple
    order: torch.Tensor | None = None
    values: torch.Tensor | None = None
    start: torch.Tensor | None = None
    seed: int = 0

    @classmethod
    def draw(cls, corruption: str, n: int, length: int, vocab_size: int, seed: int = 0) -> "DiscreteNoise":
        g = torch.Generator().manual_seed(int(seed))
        if _check_corruption(corruption) == "mask":
            return cls(corruption, (n, length), order=torch.rand((n, length), generator=g, dtype=F64),
                       values=torch.rand((n, length), generator=g, dtype=F64), seed=seed)
        return cls(corruption, (n, length), start=torch.randint(0, vocab_size, (n, length), generator=g),
                   seed=seed)


def _probs(denoiser, x, a, n, length, vocab_size):
    probs = denoiser(x, a)
    if probs.shape != (n, length, vocab_size):
        raise ValueError(f"the denoiser must return N x L x V = {(n, length, vocab_size)} probabilities, got "
                         f"{tuple(probs.shape)}: is its vocabulary size {vocab_size}?")
    return probs


def sample(denoiser, coefficients: DiscreteCoefficients, n: int, length: int, vocab_size: int,
           noise: DiscreteNoise | None = None, seed: int = 0, trajectory: bool = False):
    """``n`` sequences of ``length`` tokens from pure noise in ``coefficients.steps`` steps (one denoiser call a
    step).  ``noise`` (or a fresh one from ``seed``) fixes the randomness; with ``trajectory=True`` the states at
    every level come back too, as a list of ``steps + 1`` tensors, and the tempered predictions of every step
    (``(x, states, predictions)``)."""
    c = coefficients
    noise = noise or DiscreteNoise.draw(c.corruption, n, length, vocab_size, seed)
    if noise.corruption != c.corruption or tuple(noise.shape) != (n, length):
        raise ValueError(f"noise is for {noise.corruption} corruption of shape {tuple(noise.shape)}; the run needs "
                         f"{c.corruption} of shape {(n, length)}")
    if c.corruption == "mask":
        x = torch.full((n, length), vocab_size, dtype=torch.long)
    else:
        if int(noise.start.max()) >= vocab_size:
            raise ValueError(f"noise.start holds token {int(noise.start.max())}, outside the vocabulary of size "
                             f"{vocab_size}")
        x = noise.start.clone()
        g = torch.Generator().manual_seed(int(noise.seed) + 1)
    states, predictions = [x], []
    for i in range(c.steps):
        a, b = c.levels[i], c.levels[i + 1]
        probs = temper(_probs(denoiser, x, a, n, length, vocab_size), c.temperatures[i])
        predictions.append(probs)
        if c.corruption == "mask":
            value = _draw(probs, noise.values)
            x = torch.where((x == vocab_size) & ((noise.order < b) | (b >= 1.0)), value, x)
        else:
            x = _draw(transition(probs, x, a, b, "uniform"), torch.rand((n, length), generator=g, dtype=F64))
        states.append(x)
    return (x, states, predictions) if trajectory else x


# ------------------------------------------------------------------------------ exact measures on the testbed
def _states(length: int, symbols: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(*[torch.arange(symbols)] * length, indexing="ij"), dim=-1).reshape(-1, length)


def exact_trajectory(testbed, coefficients: DiscreteCoefficients, chunk: int = 256) -> list:
    """The sampler's exact state distributions with the testbed's exact denoiser, at every level of its grid
    (``steps + 1`` tensors over the C^L partial states in :func:`_states` order, C = V + 1 under masking, V under
    uniform corruption; C^L must be small), by propagating the distribution over every partial state step by
    step."""
    c, V, L = coefficients, testbed.vocab_size, testbed.length
    C = V + 1 if c.corruption == "mask" else V
    if C ** L > 2 ** 16:
        raise ValueError(f"the exact sampler distribution enumerates {C}^{L} = {C ** L} states; use a testbed "
                         f"with at most 2^16 states")
    states = _states(L, C)
    p = torch.zeros(C ** L, dtype=F64)
    if c.corruption == "mask":
        p[-1] = 1.0                                   # all masked
    else:
        p[:] = 1.0 / V ** L                           # uniform noise
    trajectory = [p]
    for i in range(c.steps):
        a, b = c.levels[i], c.levels[i + 1]
        support = torch.nonzero(p > 0).squeeze(1)
        q = torch.zeros_like(p)
        for part in support.split(chunk):
            x = states[part]
            probs = temper(testbed.posterior(x, a, c.corruption), c.temperatures[i])
            t = transition(probs, x, a, b, c.corruption)             # S x L x C
            out = t[:, 0]
            for l in range(1, L):
                out = (out.unsqueeze(-1) * t[:, l].unsqueeze(1)).reshape(len(part), -1)
            q += p[part] @ out
        p = q
        trajectory.append(p)
    return trajectory


def exact_distribution(testbed, coefficients: DiscreteCoefficients, chunk: int = 256) -> torch.Tensor:
    """The sampler's exact output distribution over the V^L clean sequences (in :func:`_states` order) with the
    testbed's exact denoiser (the last of :func:`exact_trajectory`)."""
    p = exact_trajectory(testbed, coefficients, chunk)[-1]
    V, L = testbed.vocab_size, testbed.length
    if coefficients.corruption == "mask":
        states = _states(L, V + 1)
        clean = (states < V).all(1)
        if float(p[~clean].sum()) > 1e-12:
            raise RuntimeError("masked tokens remain at the end of the run")
        p = p[clean]
    return p


def exact_kl(testbed, coefficients: DiscreteCoefficients) -> float:
    """KL(p || q) from the testbed's distribution p to the sampler's exact output distribution q."""
    q = exact_distribution(testbed, coefficients)
    logp = testbed.log_prob(_states(testbed.length, testbed.vocab_size))
    return float((logp.exp() * (logp - torch.log(q.clamp_min(1e-300)))).sum())


def empirical_kl(testbed, samples: torch.Tensor) -> float:
    """KL(p || q_hat) from the testbed's exact p to the empirical distribution of ``samples`` (every state
    enumerated: V^L must be small), with q_hat smoothed by adding half a count to every state, so unseen states stay
    finite."""
    V, L = testbed.vocab_size, testbed.length
    if V ** L > 2 ** 20:
        raise ValueError(f"empirical_kl enumerates V^L = {V ** L} states; use a testbed with V^L <= 2^20")
    weights = V ** torch.arange(L - 1, -1, -1)
    index = (samples.long() * weights).sum(1)
    counts = torch.bincount(index, minlength=V ** L).double() + 0.5
    q = counts / counts.sum()
    logp = testbed.log_prob(_states(L, V))
    return float((logp.exp() * (logp - torch.log(q))).sum())



# ------------------------------------------------------------------------------------------ LSD and LSD+
LOSSES = ("states", "scores")
# how the alignment loss weighs the student's steps: all alike (the paper's sum), rising linearly to the last, or the
# last step's state alone (the sampler's output, as LD3 aligns end points)
WEIGHTINGS = ("uniform", "linear", "final")


def step_weights(steps: int, weighting: str = "uniform") -> list[float]:
    """The weight of each of a ``steps``-step student's alignment terms under ``weighting`` (:data:`WEIGHTINGS`)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return [{"uniform": 1.0, "linear": (i + 1) / steps, "final": float(i == steps - 1)}[weighting]
            for i in range(steps)]


def hamming_mmd(x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> float:
    """The (biased, V-statistic) squared MMD between two sets of token sequences with the kernel
    exp(-Hamming / (scale * L / 6)); 0 when the sets are equal as multisets."""
    length, width = x.shape[1], scale * x.shape[1] / 6.0
    symbols = int(max(x.max(), y.max())) + 1
    fx, fy = (torch.nn.functional.one_hot(t, symbols).flatten(1).to(torch.float32) for t in (x, y))

    def k(a, b):  # agreements by one matrix product: Hamming = length - <onehot a, onehot b>
        return torch.exp((a @ b.T - length).double() / width).mean()

    return float(k(fx, fx) + k(fy, fy) - 2 * k(fx, fy))


def _levels_from(z: np.ndarray) -> tuple:
    """Keep levels 0 < ... < 1 from free parameters: the increments are softmax(z) (z = 0: the linear grid)."""
    inc = np.exp(z - z.max())
    return tuple(np.concatenate([[0.0], np.cumsum(inc / inc.sum())[:-1], [1.0]]).tolist())


def _teacher_at(states: list, level: float) -> torch.Tensor:
    """A linear-grid teacher's state at ``level`` (its first grid level at or above it)."""
    steps = len(states) - 1
    return states[min(steps, int(math.ceil(level * steps - 1e-9)))]


def alignment_loss(denoiser, coefficients: DiscreteCoefficients, noise: DiscreteNoise, teacher: dict,
                   vocab_size: int, loss: str = "states", weighting: str = "uniform") -> float:
    """The trajectory-alignment loss of a student sampler against a many-step teacher, summed over the student's
    steps with the weights :func:`step_weights` gives ``weighting``.  ``teacher`` holds the teacher's ``states``
    (its states on its linear grid) and ``noise``.

    - ``"states"``: the squared MMD (:func:`hamming_mmd`) between the student's states and the teacher's at the
      end level of every step: the two trajectories are aligned in distribution, so the teacher's runs are
      independent of the student's (``teacher["noise"]`` is its own).
    - ``"scores"``: the LSD paper's per-step score alignment: the squared L2 distance between the student's
      tempered clean-token prediction at its state and the teacher's prediction at the teacher's state at the
      same level, both runs from the same noise (the teacher's noise must be ``noise``), averaged over the
      positions still to be decided (the masked ones under masking)."""
    c = coefficients
    n, length = noise.shape
    _, states, mine = sample(denoiser, c, n, length, vocab_size, noise=noise, trajectory=True)
    total = 0.0
    cache = teacher.setdefault("predictions", {})   # the teacher's predictions at a level do not change
    for i, w in enumerate(step_weights(c.steps, weighting)):
        if w == 0.0:
            continue
        if loss == "states":
            total += w * hamming_mmd(states[i + 1], _teacher_at(teacher["states"], c.levels[i + 1]))
            continue
        a, x = c.levels[i], states[i]
        if a not in cache:
            cache[a] = _probs(denoiser, _teacher_at(teacher["states"], a), a, n, length, vocab_size)
        theirs = cache[a]
        open_ = (x == vocab_size) if c.corruption == "mask" else torch.ones_like(x, dtype=torch.bool)
        if open_.any():
            total += w * float((((mine[i] - theirs) ** 2).sum(-1) * open_).sum() / open_.sum())
    return total


def _fit_start(steps, teacher_steps, corruption, start) -> DiscreteCoefficients:
    """A fit's checked step counts and its starting coefficients (default: the identity ones)."""
    _check_steps(steps)
    _check_steps(teacher_steps)
    corruption = _check_corruption(corruption)
    start = start or DiscreteCoefficients.plain(steps, corruption)
    if start.steps != steps or start.corruption != corruption:
        raise ValueError(f"start must be {steps}-step {corruption} coefficients, got {start.steps}-step "
                         f"{start.corruption}")
    return start


def exact_alignment_loss(testbed, coefficients: DiscreteCoefficients, teacher: list,
                         weighting: str = "uniform") -> float:
    """The trajectory-alignment loss computed exactly on a testbed: the sum over the student's steps (weighted as
    :func:`step_weights` says) of KL(teacher's state distribution || student's) at the end level of every step, the
    teacher's distributions being ``teacher`` (:func:`exact_trajectory` of a many-step plain sampler on the linear
    grid).  It is the exact value of
    what ``alignment_loss(loss="states")`` estimates from runs, with no sampling noise, so a fit of it is limited by
    the coefficient family alone."""
    mine = exact_trajectory(testbed, coefficients)
    total = 0.0
    for i, w in enumerate(step_weights(coefficients.steps, weighting)):
        if w == 0.0:
            continue
        p, q = _teacher_at(teacher, coefficients.levels[i + 1]), mine[i + 1]
        on = p > 0
        total += w * float((p[on] * (torch.log(p[on]) - torch.log(q[on].clamp_min(1e-300)))).sum())
    return total


def fit_lsd_exact(testbed, steps: int, corruption: str = "mask", learn_levels: bool = False,
                  teacher_steps: int = 256, start: DiscreteCoefficients | None = None,
                  max_evals: int = 600, weighting: str = "uniform") -> DiscreteCoefficients:
    """LSD (temperatures) or, with ``learn_levels``, LSD+ (and the schedule) fitted on an exact testbed by
    :func:`exact_alignment_loss` (its steps weighted by ``weighting``) against the ``teacher_steps``-step plain
    sampler's exact trajectory."""
    start = _fit_start(steps, teacher_steps, corruption, start)
    step_weights(steps, weighting)   # a bad weighting is named before the teacher runs
    teacher = exact_trajectory(testbed, DiscreteCoefficients.plain(teacher_steps, corruption))
    fitted, info = fit_coefficients(lambda c: exact_alignment_loss(testbed, c, teacher, weighting), start,
                                    learn_levels, max_evals)
    meta = {"method": "LSD+" if learn_levels else "LSD", "loss": "exact", "weighting": weighting,
            "teacher_steps": teacher_steps, "loss_identity": info["before"], "loss_fitted": info["after"],
            "evaluations": info["evaluations"]}
    return DiscreteCoefficients(fitted.levels, fitted.temperatures, corruption, meta)


def fit_coefficients(objective, start: DiscreteCoefficients, learn_levels: bool = False,
                     max_evals: int = 600) -> tuple[DiscreteCoefficients, dict]:
    """Minimise ``objective(coefficients) -> float`` over the per-step temperatures (log-parameterised) and, with
    ``learn_levels``, the keep levels (softmax-parameterised increments) by Powell's derivative-free method from
    ``start``.  Returns the best coefficients and {"before", "after", "evaluations"}."""
    from scipy.optimize import minimize

    steps, corruption = start.steps, start.corruption
    theta0 = np.log(np.asarray(start.temperatures))
    if learn_levels:
        inc = np.log(np.diff(np.asarray(start.levels)))
        theta0 = np.concatenate([theta0, inc - inc.mean()])

    def unpack(theta):
        temps = tuple(np.exp(np.clip(theta[:steps], -5.0, 5.0)).tolist())
        return DiscreteCoefficients(_levels_from(theta[steps:]) if learn_levels else start.levels, temps, corruption)

    def f(theta):
        try:
            return objective(unpack(theta))
        except ValueError:      # levels that collapse onto each other are outside the family
            return math.inf

    before = f(theta0)
    res = minimize(f, theta0, method="Powell", options={"maxfev": max_evals, "xtol": 1e-3, "ftol": 1e-6})
    return unpack(res.x), {"before": before, "after": float(res.fun), "evaluations": int(res.nfev)}


def fit_lsd(denoiser, steps: int, length: int, vocab_size: int, corruption: str = "mask", learn_levels: bool = False,
            loss: str = "states", teacher_steps: int = 256, n: int = 1000, seed: int = 0,
            start: DiscreteCoefficients | None = None, max_evals: int = 600,
            weighting: str = "uniform") -> DiscreteCoefficients:
    """Fit a ``steps``-step sampler's coefficients by LSD (per-step temperatures) or, with ``learn_levels``, LSD+
    (temperatures and the time schedule) against the ``teacher_steps``-step plain sampler, minimising
    :func:`alignment_loss` (its steps weighted by ``weighting``) over ``n`` runs.  Every evaluation reuses the same
    noise, so the loss is a deterministic (piecewise-constant) function of the coefficients, and
    :func:`fit_coefficients` searches it without derivatives, from ``start`` (default: the identity coefficients)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    start = _fit_start(steps, teacher_steps, corruption, start)
    step_weights(steps, weighting)   # a bad weighting is named before the teacher runs
    noise = DiscreteNoise.draw(corruption, n, length, vocab_size, seed)
    t_noise = noise if loss == "scores" else DiscreteNoise.draw(corruption, n, length, vocab_size, seed + 7919)
    _, t_states, _ = sample(denoiser, DiscreteCoefficients.plain(teacher_steps, corruption), n, length, vocab_size,
                            noise=t_noise, trajectory=True)
    teacher = {"states": t_states, "noise": t_noise}
    fitted, info = fit_coefficients(lambda c: alignment_loss(denoiser, c, noise, teacher, vocab_size, loss, weighting),
                                    start, learn_levels, max_evals)
    meta = {"method": "LSD+" if learn_levels else "LSD", "loss": loss, "weighting": weighting,
            "teacher_steps": teacher_steps, "runs": n, "seed": seed, "loss_identity": info["before"],
            "loss_fitted": info["after"], "evaluations": info["evaluations"]}
    return DiscreteCoefficients(fitted.levels, fitted.temperatures, corruption, meta)
