"""Noise schedules: alpha(t), sigma(t), lambda(t) = log(alpha / sigma) and the inverses, in float64.

A schedule maps its native time ``t`` to the coefficients of x_t = alpha_t x0 + sigma_t eps.  Every
solver works through alpha, sigma and lambda only, so VP, VE/EDM and flow models share all solvers.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=F64)


class NoiseSchedule:
    """Base class. Subclasses define ``log_alpha_sigma(t)`` and ``t_from_lambda(lam)``."""

    t_min: float
    t_max: float

    def log_alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        log_a, log_s = self.log_alpha_sigma(_f64(t))
        return log_a.exp(), log_s.exp()

    def lam(self, t) -> torch.Tensor:
        log_a, log_s = self.log_alpha_sigma(_f64(t))
        return log_a - log_s

    def t_from_lambda(self, lam) -> torch.Tensor:
        raise NotImplementedError

    def sigma_ve(self, t) -> torch.Tensor:
        """sigma / alpha = exp(-lambda): the noise level of the VE (k-diffusion, diffusers ``sigmas``) view."""
        return torch.exp(-self.lam(t))

    def t_from_sigma_ve(self, s) -> torch.Tensor:
        return self.t_from_lambda(-torch.log(_f64(s)))

    def alpha_sigma_from_sigma_ve(self, s) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha and sigma of this schedule at VE noise level s (s = 0 gives alpha(t_min-extrapolated) clean data)."""
        s = _f64(s)
        return self.alpha_sigma(self.t_from_sigma_ve(s.clamp_min(1e-300)))


class DiscreteVP(NoiseSchedule):
    """diffusers' discrete VP schedule from betas; continuous time by interpolating log sigma_ve linearly in t.

    At integer t this is exactly alphas_cumprod[t]; ``t_from_sigma_ve`` is the inverse of the same interpolation
    (diffusers' ``_sigma_to_t``), clipped to [0, N - 1].
    """

    def __init__(self, betas, zero_terminal_snr: bool = False):
        betas = torch.as_tensor(betas)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError("betas must be a 1-D sequence of at least 2 values")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must be finite and in (0, 1]")
        self.betas = betas
        # the cumulative product in the betas' own precision (float32 for diffusers' schedules), then float64
        acp = torch.cumprod(1.0 - betas, 0)
        if zero_terminal_snr or acp[-1] <= 0:  # zero terminal SNR: diffusers' floor (fp16's smallest subnormal)
            acp[-1] = 2.0 ** -24
        self.alphas_cumprod = acp.to(F64)
        self.log_sigmas = 0.5 * (torch.log1p(-self.alphas_cumprod) - torch.log(self.alphas_cumprod))
        self.t_min, self.t_max = 0.0, float(len(betas) - 1)

    @classmethod
    def from_betas_config(cls, num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                          trained_betas=None, rescale_betas_zero_snr=False) -> "DiscreteVP":
        return cls(make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                              rescale_betas_zero_snr), zero_terminal_snr=rescale_betas_zero_snr)

    def _log_sigma_ve(self, t):
        t = t.clamp(self.t_min, self.t_max)
        lo = t.floor().clamp(max=self.t_max - 1).long()
        w = t - lo
        return (1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]

    def log_alpha_sigma(self, t):
        ls = self._log_sigma_ve(t)
        log_alpha = -0.5 * torch.log1p(torch.exp(2 * ls))
        return log_alpha, ls + log_alpha

    def t_from_lambda(self, lam):
        ls = -_f64(lam)
        table = self.log_sigmas
        idx = torch.searchsorted(table, ls.contiguous()).clamp(1, len(table) - 1)
        lo, hi = table[idx - 1], table[idx]
        w = ((ls - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1).to(F64) + w


class ContinuousVP(NoiseSchedule):
    """Continuous-time VP schedules on t in [t_min, 1]: ``linear`` (beta_min, beta_max) and ``cosine`` (iDDPM)."""

    def __init__(self, kind: str = "linear", beta_min: float = 0.1, beta_max: float = 20.0, cosine_s: float = 0.008,
                 t_min: float = 1e-3):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
        self.kind, self.beta_min, self.beta_max, self.s = kind, beta_min, beta_max, cosine_s
        self.t_min, self.t_max = t_min, 1.0 if kind == "linear" else 0.9946
        self._c0 = math.log(math.cos(cosine_s / (1 + cosine_s) * math.pi / 2))

    def _log_alpha(self, t):
        if self.kind == "linear":
            return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return torch.log(torch.cos((t + self.s) / (1 + self.s) * math.pi / 2)) - self._c0

    def log_alpha_sigma(self, t):
        log_a = self._log_alpha(t)
        return log_a, 0.5 * torch.log(-torch.expm1(2 * log_a))

    def t_from_lambda(self, lam):
        lam = _f64(lam)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        if self.kind == "linear":
            db = self.beta_max - self.beta_min
            tmp = torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))  # -2 log alpha
            return 2.0 * tmp / (torch.sqrt(self.beta_min ** 2 + 2.0 * db * tmp) + self.beta_min)
        return torch.arccos(torch.exp(log_alpha + self._c0)) * 2.0 * (1.0 + self.s) / math.pi - self.s


class VE(NoiseSchedule):
    """Variance-exploding / EDM schedule: alpha = 1, sigma = t."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t_min, self.t_max = sigma_min, sigma_max

    def log_alpha_sigma(self, t):
        return torch.zeros_like(t), torch.log(t)

    def t_from_lambda(self, lam):
        return torch.exp(-_f64(lam))


class RectifiedFlow(NoiseSchedule):
    """Rectified flow: alpha = 1 - t, sigma = t (the shift acts on the spacing, see ``timesteps.flow_shift``)."""

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0):
        self.t_min, self.t_max = t_min, t_max

    def log_alpha_sigma(self, t):
        return torch.log1p(-t), torch.log(t)

    def alpha_sigma(self, t):  # directly, not through the logs: exact, and differentiable at t = 1 (alpha = 0)
        t = _f64(t)
        return 1 - t, t

    def t_from_lambda(self, lam):
        return torch.sigmoid(-_f64(lam))


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
MAX_TRAIN_TIMESTEPS = 100_000  # diffusers' models use 1000; beyond this the tables are large for no use


def make_betas(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, rescale_betas_zero_snr=False) -> torch.Tensor:
    """diffusers' beta schedules, built exactly as diffusers builds them (float32): this is the schedule a
    diffusers-trained model saw in training (its ``add_noise`` uses these float32 values)."""
    if (isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, float))
            or not math.isfinite(num_train_timesteps) or num_train_timesteps != int(num_train_timesteps)
            or not 2 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS):
        raise ValueError(f"num_train_timesteps must be an integer in [2, {MAX_TRAIN_TIMESTEPS}], got "
                         f"{num_train_timesteps!r}")
    n = int(num_train_timesteps)
    f32 = torch.float32
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=f32).clone().reshape(-1)
        if betas.numel() != n or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"trained_betas must be num_train_timesteps ({n}) numbers in (0, 1), got "
                             f"{betas.numel()} values in [{float(betas.min()):.4g}, {float(betas.max()):.4g}]"
                             if betas.numel() else f"trained_betas must be {n} numbers in (0, 1), got none")
    elif beta_schedule in ("linear", "scaled_linear") and not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in (beta_start, beta_end))\
            or beta_schedule in ("linear", "scaled_linear") and not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"beta_start and beta_end must be numbers with 0 < beta_start <= beta_end < 1, got "
                         f"beta_start={beta_start!r}, beta_end={beta_end!r}")
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=f32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=f32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=f32)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES} (or pass trained_betas), got {beta_schedule!r}")
    if rescale_betas_zero_snr:
        abar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
        a0, aT = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
        abar_sqrt = (abar_sqrt - aT) * (a0 / (a0 - aT))
        abar = abar_sqrt ** 2
        betas = 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return betas
