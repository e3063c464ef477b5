"""Exact-score testbeds: the exact ODE solutions agree with an independent fine solve, exact samples have the
testbed's moments, fitting recovers known parameters and works on real data (scikit-learn's digits)."""
import math

import pytest
import torch

from fastsample.schedules import DiscreteVP, make_betas
from fastsample.testbeds import GaussianMixture

F64 = torch.float64


def rk4_in_log_sigma(gm, y, s_from, s_to, steps=400):
    """An independent fixed-step RK4 of dy/dlog s = y - D(y, s), the VE probability-flow ODE."""
    h = (math.log(s_to) - math.log(s_from)) / steps
    f = lambda u, y: y - gm.denoise(y, math.exp(u))  # noqa: E731
    u = math.log(s_from)
    for _ in range(steps):
        k1 = f(u, y)
        k2 = f(u + h / 2, y + h / 2 * k1)
        k3 = f(u + h / 2, y + h / 2 * k2)
        k4 = f(u + h, y + h * k3)
        y, u = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), u + h
    return y


def test_gaussian_closed_form_equals_fine_numerical_solves():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=F64)
    mean, cov = torch.randn(6, generator=g, dtype=F64), A @ A.T / 6 + 0.01 * torch.eye(6, dtype=F64)
    gauss = GaussianMixture.gaussian(mean, cov)
    twin = GaussianMixture(torch.stack([mean, mean]), torch.stack([cov, cov]))  # the same law, solved by DOP853
    y = torch.randn(5, 6, generator=g, dtype=F64) * 20
    closed = gauss.exact_solution(y, 20.0, 0.05)
    assert torch.allclose(closed, twin.exact_solution(y, 20.0, 0.05), rtol=1e-8, atol=1e-8)
    assert torch.allclose(closed, rk4_in_log_sigma(gauss, y, 20.0, 0.05), rtol=1e-6, atol=1e-6)
    # VP scaling: x = alpha y on both ends
    assert torch.allclose(gauss.exact_solution(0.5 * y, 20.0, 0.05, 0.5, 0.9), 0.9 * closed, rtol=1e-12)
    # to sigma = 0: the ODE's end point (the mean plus the shrunk deviation), finite
    end = gauss.exact_solution(y, 20.0, 0.0)
    assert torch.isfinite(end).all() and torch.allclose(end, gauss.exact_solution(y, 20.0, 1e-9), atol=1e-7)


def test_mixture_exact_solution_equals_independent_rk4():
    gm = GaussianMixture.random(dim=5, components=3, seed=4)
    y = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=F64) * 30
    exact = gm.exact_solution(y, 30.0, 0.02)
    assert float((exact - rk4_in_log_sigma(gm, y, 30.0, 0.02)).norm() / exact.norm()) < 1e-6


def test_exact_samples_have_the_testbed_moments():
    gm = GaussianMixture.random(dim=3, components=2, seed=5)
    x = gm.sample_data(200_000, torch.Generator().manual_seed(0))
    w = gm.weights
    mean = (w[:, None] * gm.means).sum(0)
    second = (w[:, None, None] * (gm.covs + gm.means[:, :, None] * gm.means[:, None, :])).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.02)
    assert torch.allclose(torch.cov(x.T), second - mean[:, None] * mean[None], atol=0.05)


def test_fit_recovers_known_parameters():
    truth = GaussianMixture.random(dim=4, components=3, seed=6)
    g = torch.Generator().manual_seed(0)
    k = torch.multinomial(truth.weights, 60_000, replacement=True, generator=g)
    z = torch.randn(60_000, 4, generator=g, dtype=F64)
    x = truth.means[k] + torch.einsum("nd,nde->ne", z * truth.evals[k].sqrt(), truth.evecs[k].transpose(1, 2))
    fitted = GaussianMixture.fit(x, labels=k, shrinkage=0.0)
    assert torch.allclose(fitted.weights, truth.weights, atol=0.01)
    assert torch.allclose(fitted.means, truth.means, atol=0.02)
    assert torch.allclose(fitted.covs, truth.covs, atol=0.03)
    with pytest.raises(ValueError, match="labels must have shape"):
        GaussianMixture.fit(x, labels=k[:10])


def test_fit_to_real_data_digits():
    """scikit-learn's bundled digits (1797 x 8 x 8): a per-class mixture with full covariances is a usable exact-score
    model, and its exact solution agrees with a fine RK4 solve."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=F64) / 8 - 1
    gm = GaussianMixture.fit(x, labels=torch.tensor(d.target), schedule=DiscreteVP(make_betas()))
    assert gm.means.shape == (10, 64) and (gm.evals > 0).all()
    noise = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), dtype=F64)
    eps = gm(noise.reshape(4, 1, 8, 8), 999)  # diffusers' call convention, any sample shape
    assert eps.shape == (4, 1, 8, 8) and torch.isfinite(eps).all()
    s0 = 157.0
    exact = gm.exact_solution(noise * s0, s0, 0.5, rtol=1e-9)
    assert float((exact - rk4_in_log_sigma(gm, noise * s0, s0, 0.5, steps=200)).norm() / exact.norm()) < 1e-6
