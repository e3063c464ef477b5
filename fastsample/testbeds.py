"""Exact-score testbeds: Gaussian-mixture data with full covariances, in any dimension.

For data x0 ~ sum_k w_k N(mu_k, S_k) and x = alpha x0 + sigma eps, everything is closed-form in the VE view
y = x / alpha, s = sigma / alpha:  p(y) = sum_k w_k N(mu_k, S_k + s^2 I) and
    E[x0 | y] = sum_k gamma_k(y) (mu_k + S_k (S_k + s^2 I)^{-1} (y - mu_k)).
A testbed is a model with diffusers' call convention ``model(x, t)`` (t = the model timestep of its schedule)
returning the exact output of the chosen ``prediction_type``; ``exact_solution`` gives the probability-flow ODE's
solution: in closed form for one Gaussian (in the eigenbasis of S each coordinate scales by
sqrt((l + s1^2) / (l + s0^2))), integrated to ~1e-11 (DOP853 in log s) for a mixture.  ``sample_data`` draws exact
data samples; ``fit`` fits a testbed to real data (one Gaussian, or one per label).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .gaussian import pf_ode_gaussian
from .parameterization import check_prediction_type, output_from
from .schedules import F64, NoiseSchedule


class GaussianMixture:
    def __init__(self, means, covs, weights=None, schedule: NoiseSchedule | None = None,
                 prediction_type: str = "epsilon", time_scale: float = 1.0):
        self.means = torch.as_tensor(means, dtype=F64)
        if self.means.ndim != 2:
            raise ValueError("means must be a K x d array")
        K, d = self.means.shape
        covs = torch.as_tensor(covs, dtype=F64)
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape {(K, d, d)}, got {tuple(covs.shape)}")
        w = torch.full((K,), 1.0 / K, dtype=F64) if weights is None else torch.as_tensor(weights, dtype=F64)
        if w.shape != (K,) or (w <= 0).any():
            raise ValueError("weights must be K positive numbers")
        self.weights = w / w.sum()
        self.evals, self.evecs = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
        if (self.evals < -1e-12).any():
            raise ValueError("covariances must be positive semi-definite")
        self.evals = self.evals.clamp_min(0.0)
        self.covs = covs
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.time_scale = time_scale
        self.dim = d

    @classmethod
    def random(cls, dim: int = 4, components: int = 3, seed: int = 0, spread: float = 2.0, **kw) -> "GaussianMixture":
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(components, dim, generator=g, dtype=F64)
        A = torch.randn(components, dim, dim, generator=g, dtype=F64) / math.sqrt(dim)
        covs = 0.3 * A @ A.transpose(1, 2) + 0.05 * torch.eye(dim, dtype=F64)
        weights = torch.rand(components, generator=g, dtype=F64) + 0.5
        return cls(means, covs, weights, **kw)

    @classmethod
    def gaussian(cls, mean, cov, **kw) -> "GaussianMixture":
        """One Gaussian N(mean, cov): its probability-flow ODE has a closed-form solution."""
        mean = torch.as_tensor(mean, dtype=F64)
        return cls(mean[None], torch.as_tensor(cov, dtype=F64)[None], **kw)

    @classmethod
    def image_like(cls, dim: int = 64, seed: int = 0, mean_scale: float = 0.5, **kw) -> "GaussianMixture":
        """One Gaussian with an image-like spectrum: eigenvalues 2 k^-1.5 (k = 1..dim) in a random orthonormal basis,
        and a random mean of scale ``mean_scale``."""
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
        cov = q @ torch.diag(2.0 * torch.arange(1, dim + 1, dtype=F64) ** -1.5) @ q.T
        return cls.gaussian(mean_scale * torch.randn(dim, generator=g, dtype=F64), cov, **kw)

    @classmethod
    def fit(cls, x: torch.Tensor, labels: torch.Tensor | None = None, shrinkage: float = 1e-3, **kw) -> "GaussianMixture":
        """Fit to data ``x`` (N x ...; flattened): one Gaussian, or with ``labels`` one component per label with its
        share of the data as weight.  ``shrinkage`` adds that multiple of the mean variance to each diagonal, so
        covariances of rank-deficient data stay positive definite."""
        x = torch.as_tensor(x, dtype=F64).reshape(len(x), -1)
        if labels is None:
            groups = [x]
        else:
            labels = torch.as_tensor(labels)
            if labels.shape != (len(x),):
                raise ValueError(f"labels must have shape {(len(x),)}, got {tuple(labels.shape)}")
            groups = [x[labels == c] for c in labels.unique()]
        if min(len(g) for g in groups) < 2:
            raise ValueError("each component needs at least 2 samples to fit a covariance")
        means = torch.stack([g.mean(0) for g in groups])
        covs = torch.stack([torch.cov(g.T).reshape(x.shape[1], x.shape[1]) for g in groups])
        eye = torch.eye(x.shape[1], dtype=F64)
        covs = covs + shrinkage * covs.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * eye
        weights = torch.tensor([len(g) for g in groups], dtype=F64)
        return cls(means, covs, weights, **kw)

    # ---- closed forms in the VE view -------------------------------------------------------------
    def denoise(self, y: torch.Tensor, s: float) -> torch.Tensor:
        """E[x0 | y] at VE noise level s for y of shape [B, d] (float64)."""
        diff = y[:, None, :] - self.means[None]                       # B K d
        proj = torch.einsum("bkd,kde->bke", diff, self.evecs)          # coordinates in each eigenbasis
        var = self.evals[None] + s * s                                 # 1 K d
        logp = (torch.log(self.weights)[None] - 0.5 * torch.log(var).sum(-1) - 0.5 * (proj ** 2 / var).sum(-1))
        gamma = torch.softmax(logp, dim=1)                             # B K
        shrunk = proj * (self.evals[None] / var)                       # S (S + s^2)^-1 (y - mu) in eigen coords
        post = self.means[None] + torch.einsum("bke,kde->bkd", shrunk, self.evecs)
        return (gamma[..., None] * post).sum(1)

    def log_density(self, y: torch.Tensor, s: float) -> torch.Tensor:
        diff = y[:, None, :] - self.means[None]
        proj = torch.einsum("bkd,kde->bke", diff, self.evecs)
        var = self.evals[None] + s * s
        logp = (torch.log(self.weights)[None] - 0.5 * torch.log(2 * math.pi * var).sum(-1) - 0.5 * (proj ** 2 / var).sum(-1))
        return torch.logsumexp(logp, dim=1)

    # ---- the model -----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, t, **kwargs) -> torch.Tensor:
        if self.schedule is None:
            raise ValueError("this testbed has no schedule: pass schedule= to use it as a model")
        tt = torch.as_tensor(t, dtype=F64).reshape(-1)[0] / self.time_scale
        a, s = (float(v) for v in self.schedule.alpha_sigma(tt))
        shape, dtype = x.shape, x.dtype
        xf = x.reshape(shape[0], -1).to(F64)
        x0 = self.denoise(xf / a, s / a)
        eps = (xf - a * x0) / s
        return output_from(self.prediction_type, x0, eps, a, s).reshape(shape).to(dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=F64)
        return self.means[k] + torch.einsum("nd,nde->ne", z * self.evals[k].sqrt(), self.evecs[k].transpose(1, 2))

    def exact_solution(self, x: torch.Tensor, sigma_from: float, sigma_to: float, alpha_from: float = 1.0,
                       alpha_to: float = 1.0, rtol: float = 1e-11) -> torch.Tensor:
        """The probability-flow ODE from VE level sigma_from to sigma_to (0 allowed): x_to for x_from = x.  Closed
        form for one Gaussian, DOP853 at ``rtol`` for a mixture."""
        shape, dtype = x.shape, x.dtype
        if len(self.weights) == 1:  # VE view: alpha = 1, sigma = s
            y = pf_ode_gaussian(x.reshape(shape[0], -1).to(F64) / alpha_from, self.means[0], self.evecs[0],
                                self.evals[0], 1.0, sigma_from, 1.0, sigma_to)
            return (alpha_to * y).reshape(shape).to(dtype)
        from scipy.integrate import solve_ivp

        y0 = (x.reshape(shape[0], -1).to(F64) / alpha_from).numpy().ravel()
        B = shape[0]
        end = max(sigma_to, 1e-9)

        def rhs(logs, y):
            yt = torch.from_numpy(y.reshape(B, -1))
            return (yt - self.denoise(yt, math.exp(logs))).numpy().ravel()

        sol = solve_ivp(rhs, (math.log(sigma_from), math.log(end)), y0, method="DOP853", rtol=rtol, atol=rtol * 1e-2)
        y = torch.from_numpy(sol.y[:, -1].reshape(B, -1))
        if sigma_to == 0:
            y = self.denoise(y, end)
        return (alpha_to * y).reshape(shape).to(dtype)


def shapes_mixture(size: int = 32, schedule: NoiseSchedule | None = None, prediction_type: str = "epsilon",
                   seed: int = 0) -> GaussianMixture:
    """An image-shaped exact-score model: 8 components whose means are simple shapes (disc, square, ring, cross,
    bars, triangle, diamond, frame) in [-1, 1], each with a smooth rank-24 covariance plus a small isotropic part."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size, dtype=F64), torch.linspace(-1, 1, size, dtype=F64), indexing="ij")
    r = torch.sqrt(xs ** 2 + ys ** 2)
    masks = [r < 0.55, (xs.abs() < 0.5) & (ys.abs() < 0.5), (r > 0.4) & (r < 0.7),
             (xs.abs() < 0.15) | (ys.abs() < 0.15), (torch.sin(6 * xs) > 0.3), (ys > -0.5) & (ys < 0.6 - 2 * xs.abs()),
             (xs.abs() + ys.abs()) < 0.7, ((xs.abs() > 0.6) | (ys.abs() > 0.6)) & (xs.abs() < 0.8) & (ys.abs() < 0.8)]
    means = torch.stack([m.to(F64) * 1.6 - 0.8 for m in masks]).reshape(len(masks), -1)
    g = torch.Generator().manual_seed(seed)
    d = size * size
    # smooth random fields: low-frequency cosines, so that samples vary in shape and brightness, not in pixel noise
    freqs = [(a, b) for a in range(4) for b in range(6)][:24]
    basis = torch.stack([torch.cos(math.pi * (a * (xs + 1) / 2)) * torch.cos(math.pi * (b * (ys + 1) / 2)) for a, b in freqs])
    basis = basis.reshape(len(freqs), d)
    basis = basis / basis.norm(dim=1, keepdim=True)
    covs = []
    for _ in masks:
        scale = 0.6 * torch.rand(len(freqs), generator=g, dtype=F64) / (1 + torch.arange(len(freqs), dtype=F64)) ** 0.5
        U = basis.T * scale.sqrt() * math.sqrt(d) * 0.25
        covs.append(U @ U.T + 1e-3 * torch.eye(d, dtype=F64))
    return GaussianMixture(means, torch.stack(covs), schedule=schedule, prediction_type=prediction_type)
