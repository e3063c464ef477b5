"""Properties of the core: schedules, parameterizations, spacings and the exponential-integrator algebra."""
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from fastsample import expint
from fastsample import parameterization as P
from fastsample import timesteps as T
from fastsample.schedules import VE, ContinuousVP, DiscreteVP, RectifiedFlow, make_betas

F64 = torch.float64


@pytest.mark.parametrize("kw", [dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                                dict(beta_schedule="squaredcos_cap_v2"), dict(rescale_betas_zero_snr=True),
                                dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist())])
def test_discrete_vp_is_diffusers_training_schedule(kw):
    ref = DPMSolverMultistepScheduler(**kw)
    vp = DiscreteVP.from_betas_config(**kw)
    assert torch.equal(vp.alphas_cumprod.float(), ref.alphas_cumprod)
    t = torch.arange(1000, dtype=F64)
    a, s = vp.alpha_sigma(t)
    assert torch.allclose(a ** 2, vp.alphas_cumprod, rtol=1e-12)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(a), atol=1e-12)


@pytest.mark.parametrize("schedule", [DiscreteVP(make_betas()), ContinuousVP("linear"), ContinuousVP("cosine"),
                                      VE(0.002, 80.0), RectifiedFlow()], ids=lambda s: type(s).__name__ + getattr(s, "kind", ""))
def test_schedule_inverse_round_trips(schedule):
    t = torch.linspace(schedule.t_min + 1e-3 * (schedule.t_max - schedule.t_min), schedule.t_max * 0.999, 57, dtype=F64)
    lam = schedule.lam(t)
    assert torch.all(lam[1:] < lam[:-1])  # lambda decreases with time
    assert torch.allclose(schedule.t_from_lambda(lam), t, rtol=1e-9, atol=1e-9)
    assert torch.allclose(schedule.t_from_sigma_ve(schedule.sigma_ve(t)), t, rtol=1e-9, atol=1e-9)
    a, s = schedule.alpha_sigma(t)
    assert torch.allclose(torch.log(a / s), lam, atol=1e-10)


def test_continuous_vp_linear_closed_form():
    sch = ContinuousVP("linear", 0.1, 20.0)
    t = torch.tensor([0.25, 0.5, 1.0], dtype=F64)
    a, _ = sch.alpha_sigma(t)
    assert torch.allclose(a, torch.exp(-0.25 * t ** 2 * 19.9 - 0.05 * t), rtol=1e-14)


@pytest.mark.parametrize("pred", P.PREDICTION_TYPES)
@pytest.mark.parametrize("alpha,sigma", [(0.9, math.sqrt(1 - 0.81)), (1.0, 3.0), (0.3, 0.7)])
def test_parameterization_round_trip(pred, alpha, sigma):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 5, generator=g, dtype=F64), torch.randn(4, 5, generator=g, dtype=F64)
    x = alpha * x0 + sigma * eps
    out = P.output_from(pred, x0, eps, alpha, sigma)
    assert torch.allclose(P.convert(out, x, pred, alpha, sigma, "x0"), x0, atol=1e-12)
    assert torch.allclose(P.convert(out, x, pred, alpha, sigma, "eps"), eps, atol=1e-12)


def test_dynamic_threshold_matches_imagen_rule():
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.5, 2.0, 4.0]).view(3, 1, 1, 1)
    out = P.dynamic_threshold(x0, 0.9, 3.0)
    for b in range(3):
        s = float(torch.quantile(x0[b].abs().flatten(), 0.9).clamp(1.0, 3.0))
        assert torch.allclose(out[b], x0[b].clamp(-s, s) / s)
    assert torch.equal(P.dynamic_threshold(x0, 0.995, 1.0), x0.clamp(-1, 1))  # diffusers' default: static clipping


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        P.convert(torch.zeros(1), torch.zeros(1), "score", 1.0, 1.0)


def test_phi_functions_stable_and_exact():
    for z in [-0.05, -0.5, -2.0, -30.0, 0.7, 3.0]:  # where the direct formulas are still accurate
        assert abs(expint.phi(1, z) - math.expm1(z) / z) < 1e-14
        assert abs(expint.phi(2, z) - (math.expm1(z) - z) / z ** 2) < 1e-11
    for z in [-1e-8, 1e-6]:  # where they cancel: the series
        assert abs(expint.phi(2, z) - (0.5 + z / 6 + z * z / 24)) < 1e-16
        assert abs(expint.phi(3, z) - (1 / 6 + z / 24 + z * z / 120)) < 1e-16
    assert expint.phi(3, -math.inf) == 0.0


@pytest.mark.parametrize("kind", ["data", "noise"])
@pytest.mark.parametrize("h", [1e-3, 0.3, 2.0])
def test_exp_lagrange_weights_integrate_polynomials_exactly(kind, h):
    from scipy.integrate import quad

    offsets = [0.0, -0.7 * h, -1.5 * h]
    w = expint.exp_lagrange_weights(offsets, h, kind)
    K = (lambda u: math.exp(-(h - u))) if kind == "data" else (lambda u: math.exp(-u))
    for p in ([1.0], [0.3, -2.0], [0.1, 0.5, 1.7]):
        poly = np.polynomial.Polynomial(p)
        exact = quad(lambda u: K(u) * poly(u), 0, h, epsabs=1e-15, epsrel=1e-13)[0]
        assert abs(sum(wj * poly(u) for wj, u in zip(w, offsets)) - exact) < 1e-10 * max(1.0, abs(exact)) + 1e-14


def test_noise_weights_reach_sigma_zero():
    w = expint.exp_lagrange_weights([0.0, -0.5, -1.1], math.inf, "noise")
    assert abs(sum(w) - 1.0) < 1e-12  # int_0^inf e^{-u} du = 1 for a constant


def test_quadrature_weights_equal_exact_weights_in_lambda():
    """tAB-DEIS with t = lambda itself must reproduce the exact Lagrange-in-lambda weights."""
    nodes = [0.4, 0.1, -0.3]
    for kind in ("data", "noise"):
        q = expint.quadrature_lagrange_weights(nodes, 0.4, 0.5, lambda lam: lam, kind)
        e = expint.exp_lagrange_weights([n - 0.4 for n in nodes], 0.5, kind)
        assert np.allclose(q, e, atol=1e-13)


def test_timestep_spacings_equal_diffusers():
    for spacing in T.TIMESTEP_SPACINGS:
        ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=1)
        for n in (1, 7, 10, 25, 998):
            ref.set_timesteps(n)
            assert np.array_equal(T.discrete_timesteps(spacing, n, 1000, 1), ref.timesteps.numpy()), (spacing, n)
    # diffusers' "leading" grid with 999 steps and offset 1 starts at timestep 1000, which the model never saw
    with pytest.raises(ValueError, match="steps_offset=1 .* beyond the last trained one"):
        T.discrete_timesteps("leading", 999, 1000, 1)


def test_sigma_spacings():
    vp = DiscreteVP(make_betas())
    lo, hi = 0.0292, 157.4
    for sp in T.SIGMA_SPACINGS:
        s = T.sigma_spacing(sp, 12, lo, hi, vp)
        assert len(s) == 12 and np.all(np.diff(s) < 0), sp
        if not sp.startswith("ays"):
            assert s[0] == pytest.approx(hi, rel=1e-9) and s[-1] == pytest.approx(lo, rel=1e-9), sp
    k = T.sigma_spacing("karras", 5, lo, hi, vp)
    assert np.allclose(k, (hi ** (1 / 7) + np.linspace(0, 1, 5) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7)
    lam = -np.log(T.sigma_spacing("logsnr", 9, lo, hi, vp))
    assert np.allclose(np.diff(lam), np.diff(lam)[0])
    assert np.allclose(T.sigma_spacing("ays_sd15", 10, lo, hi, vp), T.AYS_SIGMAS["sd15"])  # the published list
    ays20 = T.sigma_spacing("ays_sd15", 19, lo, hi, vp)
    assert np.allclose(ays20[::2], T.AYS_SIGMAS["sd15"])  # log-linear interpolation keeps the published nodes


def test_flow_shift():
    s = T.flow_sigmas(4, 1000, shift=3.0)
    base = np.linspace(1, 1e-3, 5)[:-1]
    assert np.allclose(s, 3 * base / (1 + 2 * base))
    assert np.allclose(T.shift_flow(base, mu=math.log(3.0)), s)


@pytest.mark.parametrize("bad", [[5, 3, 4], [3, 3, 1], [float("nan"), 1.0], []])
def test_non_monotone_levels_rejected(bad):
    with pytest.raises(ValueError, match="sigmas must"):
        T.check_descending("sigmas", bad)
