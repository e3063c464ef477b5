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

    # ---- targets built from mixtures (Feynman-Kac correctors' exactness tests) -----------------------
    def _like(self, means, covs, weights) -> "GaussianMixture":
        return GaussianMixture(means, covs, weights, self.schedule, self.prediction_type, self.time_scale)

    def product(self, other: "GaussianMixture") -> "GaussianMixture":
        """The normalised product p1 p2, exactly: component (i, j) is N(m, C) with C = (S_i^-1 + G_j^-1)^-1,
        m = C (S_i^-1 mu_i + G_j^-1 nu_j), weight a_i b_j N(mu_i; nu_j, S_i + G_j) (normalised), in order i-major."""
        if other.dim != self.dim:
            raise ValueError(f"dimensions differ: {self.dim} and {other.dim}")
        means, covs, logw = [], [], []
        for i in range(len(self.weights)):
            for j in range(len(other.weights)):
                pi, pj = torch.linalg.inv(self.covs[i]), torch.linalg.inv(other.covs[j])
                C = torch.linalg.inv(pi + pj)
                means.append(C @ (pi @ self.means[i] + pj @ other.means[j]))
                covs.append(0.5 * (C + C.T))
                z = torch.distributions.MultivariateNormal(other.means[j], self.covs[i] + other.covs[j])
                logw.append(torch.log(self.weights[i] * other.weights[j]) + z.log_prob(self.means[i]))
        return self._like(torch.stack(means), torch.stack(covs), torch.softmax(torch.stack(logw), 0))

    def annealed(self, beta: float) -> "GaussianMixture":
        """p^beta (normalised) in the limit of well-separated components: N(mu_k, S_k / beta) with weights
        proportional to w_k^beta |S_k|^((1 - beta) / 2) (the integral of N^beta up to a common factor)."""
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        logdet = torch.log(self.evals.clamp_min(1e-300)).sum(1)
        logw = beta * torch.log(self.weights) + 0.5 * (1 - beta) * logdet
        return self._like(self.means, self.covs / beta, torch.softmax(logw, 0))

    def geometric_mean(self, other: "GaussianMixture", w: float) -> "GaussianMixture":
        """p_self^(1-w) p_other^w (normalised) for two mixtures whose components share their means, in the limit of
        well-separated components: component k is N(mu_k, P_k^-1) with precision P_k = (1-w) S_k^-1 + w G_k^-1
        (it must be positive definite) and weight proportional to
        a_k^(1-w) b_k^w |S_k|^(-(1-w)/2) |G_k|^(-w/2) |P_k|^(-1/2) (the integral of the product of powers)."""
        if other.means.shape != self.means.shape or not torch.equal(other.means, self.means):
            raise ValueError("geometric_mean needs two mixtures whose components have the same means")
        prec = (1 - w) * torch.linalg.inv(self.covs) + w * torch.linalg.inv(other.covs)
        evals = torch.linalg.eigvalsh(prec)
        if (evals <= 0).any():
            raise ValueError(f"(1 - w) S^-1 + w G^-1 is not positive definite for w = {w}: no normalisable target")
        logw = ((1 - w) * (torch.log(self.weights) - 0.5 * torch.logdet(self.covs))
                + w * (torch.log(other.weights) - 0.5 * torch.logdet(other.covs)) - 0.5 * torch.log(evals).sum(1))
        return self._like(self.means, torch.linalg.inv(prec), torch.softmax(logw, 0))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The data's mean and covariance: sum_k w_k mu_k and sum_k w_k (S_k + mu_k mu_k^T) - mean mean^T."""
        mean = self.weights @ self.means
        second = torch.einsum("k,kde->de", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return mean, second - torch.outer(mean, mean)

    def _projected(self, y: torch.Tensor, s) -> tuple[torch.Tensor, torch.Tensor]:
        """(y - mu_k) in each component's eigenbasis [B, K, d] and the variances S_k + s^2 there [1, K, d]."""
        proj = torch.einsum("bkd,kde->bke", y[:, None, :] - self.means[None], self.evecs)
        return proj, self.evals[None] + s * s

    def _log_probs(self, proj: torch.Tensor, var: torch.Tensor, normalised: bool = True) -> torch.Tensor:
        """log w_k + log N per component; without the 2 pi factor when not ``normalised`` (enough for a softmax)."""
        return (torch.log(self.weights)[None] - 0.5 * torch.log(2 * math.pi * var if normalised else var).sum(-1)
                - 0.5 * (proj ** 2 / var).sum(-1))

    def component_log_probs(self, x: torch.Tensor, s: float = 0.0) -> torch.Tensor:
        """log w_k + log N(y; mu_k, S_k + s^2 I) for y = x [B, d] (VE level s): [B, K]."""
        proj, var = self._projected(x.reshape(len(x), -1).to(F64), s)
        return self._log_probs(proj, var.clamp_min(1e-300))

    def component_shares(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The (weighted) share of samples ``x`` nearest, by posterior, to each component: [K]."""
        k = self.component_log_probs(x).argmax(1)
        w = torch.full((len(x),), 1.0 / len(x), dtype=F64) if weights is None else weights.to(F64) / weights.sum()
        return torch.zeros(len(self.weights), dtype=F64).index_add_(0, k, w)

    # ---- closed forms in the VE view -------------------------------------------------------------
    def denoise(self, y: torch.Tensor, s: float) -> torch.Tensor:
        """E[x0 | y] at VE noise level s for y of shape [B, d] (float64)."""
        proj, var = self._projected(y, s)
        gamma = torch.softmax(self._log_probs(proj, var, normalised=False), dim=1)  # B K
        shrunk = proj * (self.evals[None] / var)                       # S (S + s^2)^-1 (y - mu) in eigen coords
        post = self.means[None] + torch.einsum("bke,kde->bkd", shrunk, self.evecs)
        return (gamma[..., None] * post).sum(1)

    def log_density(self, y: torch.Tensor, s: float) -> torch.Tensor:
        return torch.logsumexp(self.component_log_probs(y, s), dim=1)

    # ---- the model -----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, t, **kwargs) -> torch.Tensor:
        if self.schedule is None:
            raise ValueError("this testbed has no schedule: pass schedule= to use it as a model")
        tt = torch.as_tensor(t, dtype=F64).reshape(-1)[0] / self.time_scale
        a, s = self.schedule.alpha_sigma(tt)  # tensors: the output is differentiable in t (learned schedules)
        shape, dtype = x.shape, x.dtype
        xf = x.reshape(shape[0], -1).to(F64)
        if a == 0:  # pure noise (a flow model at t = 1): x carries nothing, E[x0 | x] is the data mean
            x0 = (self.weights[:, None] * self.means).sum(0).expand_as(xf)
        else:
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


FKC_TARGETS = ("product", "anneal", "cfg")


def fkc_case(target: str, dim: int = 2, schedule: NoiseSchedule | None = None):
    """Feynman-Kac exactness testbeds: ``(models, exact, options, call)`` with ``models`` the model(s) to pass to
    ``FKCSampler``, ``exact`` the target as a mixture whose component weights the weighted particles must recover,
    ``options`` the target's keyword (beta or guidance_scale) and ``call`` the keywords of ``sample`` (for CFG the
    one model is ``ConditionalPair``, switched by ``cond``).  Dimensions past 2 are shared N(0, 0.5) in every
    component.

    - ``"product"``: p1 (components at (+-3, 0), long in y) times p2 (at (0, -2) and (0, 6), long in x): four product
      components whose weights change with the noise level, so the unweighted sum of scores misses them.
    - ``"anneal"``: p^2 of components at (+-4, 0) with weights 0.3 / 0.7 and scales 0.5 / 1.5 (separated limit).
    - ``"cfg"``: p_u^(-2) p_c^3 (guidance 3) for components at (+-4, 0) with weights 0.5 / 0.5, p_u's of variance 1,
      p_c's of variances 0.5 / 1 (separated limit: weights 2/3, 1/3): the noisy paths of p_u and p_c differ, so plain
      CFG misses the geometric mean.
    ``options`` carries ``sigma_data``, the models' per-dimension data scale, for the tracking drift.
    """
    from .schedules import DiscreteVP

    if target not in FKC_TARGETS:
        raise ValueError(f"target must be one of {FKC_TARGETS}, got {target!r}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    schedule = schedule or DiscreteVP.from_betas_config()

    def mix(means, diag_covs, weights):
        means = torch.tensor([list(m) + [0.0] * (dim - 2) for m in means], dtype=F64)
        covs = torch.stack([torch.diag(torch.tensor(list(c) + [0.5] * (dim - 2), dtype=F64)) for c in diag_covs])
        return GaussianMixture(means, covs, weights, schedule=schedule)

    if target == "product":
        p1 = mix([(-3, 0), (3, 0)], [(0.5, 8), (0.5, 8)], [0.3, 0.7])
        p2 = mix([(0, -2), (0, 6)], [(8, 0.5), (8, 0.5)], [0.5, 0.5])
        mixtures, models, exact, options, call = [p1, p2], [p1, p2], p1.product(p2), {}, {}
    elif target == "anneal":
        p = mix([(-4, 0), (4, 0)], [(0.5, 0.5), (1.5, 1.5)], [0.3, 0.7])
        mixtures, models, exact, options, call = [p], [p], p.annealed(2.0), {"beta": 2.0}, {}
    else:
        pu = mix([(-4, 0), (4, 0)], [(1, 1), (1, 1)], [0.5, 0.5])
        pc = mix([(-4, 0), (4, 0)], [(0.5, 0.5), (1, 1)], [0.5, 0.5])
        mixtures, models = [pu, pc], [ConditionalPair(pu, pc)]
        exact, options = pu.geometric_mean(pc, 3.0), {"guidance_scale": 3.0}
        call = {"cond": True, "uncond": {"cond": False}}
    options["sigma_data"] = torch.stack([m.moments()[1].diagonal() for m in mixtures]).mean(0).sqrt()
    return models, exact, options, call


class ConditionalPair:
    """One model of two exact ones: ``model(x, t, cond=True)`` is ``cond_model``, ``cond=False`` ``uncond_model``."""

    def __init__(self, uncond_model, cond_model):
        self.uncond_model, self.cond_model = uncond_model, cond_model

    def __call__(self, x: torch.Tensor, t, cond: bool = True, **kwargs) -> torch.Tensor:
        return (self.cond_model if cond else self.uncond_model)(x, t, **kwargs)


# ---------------------------------------------------------------------------------------------- discrete
CORRUPTIONS = ("mask", "uniform")


class CategoricalMixture:
    """Discrete data x0 in {0..V-1}^L from a mixture of product-categorical distributions,
    p(x0) = sum_k w_k prod_l P_k[l, x0_l], with everything a discrete-diffusion sampler needs in closed form.

    Corruption at keep level ``alpha`` in [0, 1] acts on each position independently:
    - "mask" (absorbing): x_l = x0_l with probability alpha, else the mask token ``V`` (``mask_id``);
    - "uniform": x_l = x0_l with probability alpha, else a value drawn uniformly from the V values.
    Given a corrupted x, the component posterior is r_k ∝ w_k prod_l sum_v P_k[l, v] q(x_l | v), and the exact
    posterior marginal of x0_l is sum_k r_k P_k[l, v] q(x_l | v) / sum_v' P_k[l, v'] q(x_l | v') (``posterior``):
    the exact denoiser.  ``log_prob`` is the exact log-likelihood of clean data."""

    def __init__(self, probs: torch.Tensor, weights: torch.Tensor | None = None):
        probs = torch.as_tensor(probs, dtype=F64)
        if probs.ndim != 3 or probs.shape[1] < 1 or probs.shape[2] < 2:
            raise ValueError(f"probs must be K x L x V with V >= 2, got shape {tuple(probs.shape)}")
        if not torch.isfinite(probs).all() or (probs < 0).any() or not torch.allclose(probs.sum(-1), torch.ones(()).to(probs)):
            raise ValueError("probs must be finite, non-negative and sum to 1 over the values")
        k = probs.shape[0]
        weights = torch.full((k,), 1.0 / k, dtype=F64) if weights is None else torch.as_tensor(weights, dtype=F64)
        if weights.shape != (k,) or (weights < 0).any() or not math.isclose(float(weights.sum()), 1.0, rel_tol=1e-9):
            raise ValueError(f"weights must be {k} non-negative numbers that sum to 1, got {weights.tolist()}")
        self.probs, self.weights = probs, weights
        self.num_components, self.length, self.vocab_size = probs.shape
        self.mask_id = self.vocab_size

    @classmethod
    def random(cls, length: int = 8, vocab_size: int = 4, components: int = 3, concentration: float = 0.5,
               seed: int = 0) -> "CategoricalMixture":
        """Components with Dirichlet(``concentration``) rows: small concentrations give peaked, distinct components."""
        rng = np.random.default_rng(seed)
        probs = torch.from_numpy(rng.dirichlet(np.full(vocab_size, concentration), size=(components, length))) + 1e-6
        weights = torch.from_numpy(rng.dirichlet(np.full(components, 2.0)))
        return cls(probs / probs.sum(-1, keepdim=True), weights)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        rows = self.probs[comp].reshape(n * self.length, self.vocab_size)
        return torch.multinomial(rows, 1, generator=generator).reshape(n, self.length)

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """log p(x0) for clean tokens (N x L, values in 0..V-1)."""
        x0 = self._check(x0, allow_mask=False)
        logp = torch.log(self.probs).unsqueeze(0)                                    # 1 x K x L x V
        picked = logp.expand(len(x0), -1, -1, -1).gather(3, x0[:, None, :, None].expand(-1, self.num_components, -1, 1))
        return torch.logsumexp(torch.log(self.weights) + picked.squeeze(-1).sum(-1), dim=1)

    def corrupt(self, x0: torch.Tensor, alpha: float, corruption: str = "mask",
                generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = self._check(x0, allow_mask=False)
        alpha = _check_alpha(alpha)
        keep = torch.rand(x0.shape, generator=generator, dtype=F64) < alpha
        if _check_corruption(corruption) == "mask":
            other = torch.full_like(x0, self.mask_id)
        else:
            other = torch.randint(0, self.vocab_size, x0.shape, generator=generator)
        return torch.where(keep, x0, other)

    def likelihood(self, x: torch.Tensor, alpha: float, corruption: str = "mask") -> torch.Tensor:
        """q(x_l | x0_l = v) as N x L x V."""
        alpha, V = _check_alpha(alpha), self.vocab_size
        x = self._check(x, allow_mask=_check_corruption(corruption) == "mask")
        hit = torch.nn.functional.one_hot(x.clamp_max(V - 1), V).to(F64)
        if corruption == "mask":
            masked = (x == self.mask_id).unsqueeze(-1)
            return torch.where(masked, torch.full_like(hit, 1 - alpha), alpha * hit)
        return alpha * hit + (1 - alpha) / V

    def posterior(self, x: torch.Tensor, alpha: float, corruption: str = "mask") -> torch.Tensor:
        """The exact p(x0_l = v | x) for every position, N x L x V."""
        q = self.likelihood(x, alpha, corruption).unsqueeze(1)                         # N x 1 x L x V
        joint = self.probs.unsqueeze(0) * q                                              # N x K x L x V
        per_pos = joint.sum(-1)                                                          # N x K x L
        log_r = torch.log(self.weights) + torch.log(per_pos).sum(-1)                     # N x K
        r = torch.softmax(log_r, dim=1)
        return (r[:, :, None, None] * joint / per_pos.unsqueeze(-1)).sum(1)

    def _check(self, x: torch.Tensor, allow_mask: bool) -> torch.Tensor:
        x = torch.as_tensor(x)
        top = self.vocab_size + (1 if allow_mask else 0)
        if x.ndim != 2 or x.shape[1] != self.length:
            raise ValueError(f"tokens must be N x {self.length}, got shape {tuple(x.shape)}")
        if x.dtype.is_floating_point or (x < 0).any() or (x >= top).any():
            raise ValueError(f"tokens must be integers in [0, {top - 1}] (vocabulary size {self.vocab_size}"
                             f"{', plus the mask ' + str(self.mask_id) if allow_mask else ''}), got values in "
                             f"[{int(x.min())}, {int(x.max())}]")
        return x.long()


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha (the keep probability) must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_corruption(corruption: str) -> str:
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    return corruption
