"""Equality with diffusers where the algorithm is the same, over full 10- and 25-step loops."""
import itertools

import pytest
import torch
from diffusers import DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from conftest import rel_err, run_loop
from fastsample.solvers import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler

PREDS = ["epsilon", "v_prediction", "sample"]
SPACING = [{}, {"use_karras_sigmas": True}, {"use_lu_lambdas": True}]


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"])
def test_dpm_solver_pp_matches_diffusers(latents, n, order, solver_type, algorithm_type):
    if algorithm_type == "sde-dpmsolver++" and order == 3:
        pytest.skip("diffusers' SDE 3M has a sign error: see test_sde_3m_follows_the_taylor_expansion")
    for pred, extra, thr in itertools.product(PREDS, SPACING, [False, True]):
        cfg = dict(solver_order=order, solver_type=solver_type, algorithm_type=algorithm_type, prediction_type=pred,
                   thresholding=thr, sample_max_value=1.5, **extra)
        if algorithm_type == "dpmsolver":
            if extra:
                continue  # diffusers duplicates the final sigma_min there (a wasted step); we do not
            cfg["final_sigmas_type"] = "sigma_min"
        ref = run_loop(DPMSolverMultistepScheduler(**cfg), latents.clone(), n, generator_seed=3)
        ours = run_loop(DPMSolverPlusPlusScheduler(**cfg), latents.clone(), n, generator_seed=3)
        assert rel_err(ours, ref) < 1e-5, cfg


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("pred", PREDS)
def test_deis_logrho_matches_diffusers(latents, n, order, pred):
    cfg = dict(solver_order=order, prediction_type=pred)
    # in float32 diffusers' closed-form order-3 weights lose ~1e-4 to cancellation; with its sigmas in float64
    # the algorithms agree to 1e-7.  Compare both ways.
    ref = diffusers_loop(DEISMultistepScheduler(**cfg), latents.double(), n)
    ours = run_loop(DEISScheduler(solver_type="logrho", **cfg), latents.double(), n)
    assert rel_err(ours, ref) < 1e-6
    ref32 = diffusers_loop(DEISMultistepScheduler(**cfg), latents.clone(), n, upcast=False)
    ours32 = run_loop(DEISScheduler(solver_type="logrho", **cfg), latents.clone(), n)
    assert rel_err(ours32, ref32) < (1e-5 if order < 3 else 3e-4)


def diffusers_loop(s, x, n, upcast=True):
    from conftest import smooth_model

    s.set_timesteps(n)
    if upcast:
        s.sigmas = s.sigmas.double()
    for t in s.timesteps:
        x = s.step(smooth_model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_unipc_matches_diffusers(latents, n, order, solver_type):
    checked = 0
    for pred, extra in itertools.product(PREDS, [{}, {"use_karras_sigmas": True}, {"final_sigmas_type": "sigma_min"},
                                                 {"predict_x0": False, "final_sigmas_type": "sigma_min"}]):
        cfg = dict(solver_order=order, solver_type=solver_type, prediction_type=pred, **extra)
        ref = diffusers_loop(UniPCMultistepScheduler(**cfg), latents.double(), n)
        ours = run_loop(UniPCScheduler(**cfg), latents.double(), n)
        assert torch.isfinite(ours).all(), cfg
        if not torch.isfinite(ref).all():
            assert solver_type == "bh1" and cfg.get("final_sigmas_type", "zero") == "zero"  # diffusers' NaN
            continue
        assert rel_err(ours, ref) < 1e-6, cfg
        ref32 = diffusers_loop(UniPCMultistepScheduler(**cfg), latents.clone(), n, upcast=False)
        ours32 = run_loop(UniPCScheduler(**cfg), latents.clone(), n)
        assert rel_err(ours32, ref32) < 1e-4, cfg
        checked += 1
    assert checked >= 6


def test_sde_dpmsolver_pp_order1_is_ddpm_ancestral(latents):
    """SDE-DPM-Solver++1 is DDPM's ancestral step with the posterior variance, given the same noise."""
    ts = [999, 800, 600, 400, 200, 50]
    ours = DPMSolverPlusPlusScheduler(solver_order=1, algorithm_type="sde-dpmsolver++")
    ref = DDPMScheduler(variance_type="fixed_small", clip_sample=False)
    a = run_loop(ours, latents.clone(), timesteps=ts, generator_seed=7)
    b = run_loop(ref, latents.clone(), timesteps=ts, generator_seed=7)
    assert rel_err(a, b) < 1e-5


def test_sde_eta_zero_is_the_ode(latents):
    for order in (1, 2, 3):
        a = run_loop(DPMSolverPlusPlusScheduler(solver_order=order, algorithm_type="sde-dpmsolver++", eta=0.0),
                     latents.clone(), 12, generator_seed=1)
        b = run_loop(DPMSolverPlusPlusScheduler(solver_order=order), latents.clone(), 12)
        assert torch.equal(a, b)


def test_unipc_bh2_order2_predictor_is_dpm_solver_pp_2m(latents):
    """UniP-2 with B(h) = expm1(-h) is DPM-Solver++(2M): with the corrector off the loops agree."""
    n = 12
    a = run_loop(UniPCScheduler(solver_order=2, disable_corrector=list(range(n))), latents.clone(), n)
    b = run_loop(DPMSolverPlusPlusScheduler(solver_order=2, lower_order_final=False), latents.clone(), n)
    assert rel_err(a, b) < 1e-6


def _kdiffusion_3m_sde(x, sigmas_ve, denoise, noises, eta=1.0):
    """k-diffusion's published dpmpp_3m_sde update, written out in the VE variables it uses (x_ve = x / alpha)."""
    d1 = d2 = None
    h1 = h2 = None
    for i in range(len(sigmas_ve) - 1):
        s, sn = sigmas_ve[i], sigmas_ve[i + 1]
        den = denoise(x, i)
        if sn == 0:
            x = den
        else:
            t, tn = -torch.log(s), -torch.log(sn)
            h = tn - t
            he = h * (eta + 1)
            x = torch.exp(-he) * x + (-he).expm1().neg() * den
            if h2 is not None:
                r0, r1 = h1 / h, h2 / h
                d10, d11 = (den - d1) / r0, (d1 - d2) / r1
                dd1 = d10 + (d10 - d11) * r0 / (r0 + r1)
                dd2 = (d10 - d11) / (r0 + r1)
                phi2 = he.neg().expm1() / he + 1
                phi3 = phi2 / he - 0.5
                x = x + phi2 * dd1 - phi3 * dd2
            elif h1 is not None:
                r = h1 / h
                phi2 = he.neg().expm1() / he + 1
                x = x + phi2 * (den - d1) / r
            x = x + noises[i] * sn * (-2 * h * eta).expm1().neg().sqrt()
            h1, h2 = h, h1
        d1, d2 = den, d1
    return x


def test_sde_3m_follows_the_taylor_expansion(latents):
    """Our SDE-DPM-Solver++(3M) is k-diffusion's dpmpp_3m_sde (the published formula), step for step.
    diffusers' sde-dpmsolver++ order 3 writes c2 = (1 - e^{-2h} - 2h)/(2h)^2 - 1/2 with a + sign, an O(1) weight
    on the O(h^2) second difference instead of phi3 = O(h): it differs, and is excluded from the equality test."""
    from conftest import smooth_model

    n = 10
    s = DPMSolverPlusPlusScheduler(solver_order=3, algorithm_type="sde-dpmsolver++", solver_type="heun",
                                   use_karras_sigmas=True, lower_order_final=False)
    s.set_timesteps(n)
    x = latents.double()
    noises = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(n)]
    ours = x.clone()
    for i, t in enumerate(s.timesteps):
        ours = s.step(smooth_model(ours, t), t, ours, variance_noise=noises[i]).prev_sample
    sig = s.sigmas.double()
    alpha = 1 / torch.sqrt(1 + sig ** 2)

    def denoise(x_ve, i):  # the same model and epsilon conversion, in VE variables
        a = alpha[i]
        x_vp = x_ve * a
        return (x_vp - a * sig[i] * smooth_model(x_vp, s.timesteps[i])) / a

    ref = _kdiffusion_3m_sde(x / alpha[0], sig, denoise, noises)
    assert rel_err(ours, ref) < 1e-6  # scheduler.sigmas is float32; the grid is float64


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("orders", [(1, 1), (2, 2), (2, 1), (3, 3), (3, 4), (4, 4)])
@pytest.mark.parametrize("algorithm_type", ["data_prediction", "noise_prediction"])
def test_sa_solver_matches_diffusers(latents, n, orders, algorithm_type, monkeypatch):
    """SA-Solver's stochastic predictor-corrector, the corrector reusing its step's noise, equals diffusers'
    SASolverScheduler with the same generator: default tau (1 on timesteps [200, 800]), tau everywhere and tau 0."""
    import diffusers.schedulers.scheduling_sasolver as theirs_module
    from diffusers import SASolverScheduler as TheirSA

    # our schedulers draw float32 noise whatever the sample's dtype (the same draws in float16, 32 and 64); diffusers
    # draws in the sample's dtype: draw its noise as ours, so that float64 runs compare too
    draw = theirs_module.randn_tensor
    monkeypatch.setattr(theirs_module, "randn_tensor",
                        lambda shape, dtype=None, **kw: draw(shape, dtype=torch.float32, **kw).to(dtype))

    from fastsample.solvers import SASolverScheduler

    p, c = orders
    for pred, (tau, tau_range), thr in itertools.product(PREDS, [(1.0, [200, 800]), (0.6, None), (0.0, None)],
                                                         [False, True]):
        if thr and algorithm_type == "noise_prediction":
            continue  # diffusers thresholds the data prediction only
        cfg = dict(predictor_order=p, corrector_order=c, algorithm_type=algorithm_type, prediction_type=pred,
                   thresholding=thr, sample_max_value=1.5)
        lo, hi = tau_range or (-1, 10 ** 9)
        theirs = lambda: TheirSA(**cfg, tau_func=lambda t: tau if lo <= t <= hi else 0)  # noqa: E731
        ours = lambda: SASolverScheduler(**cfg, tau=tau, tau_range=tau_range)  # noqa: E731
        # diffusers expands the Lagrange polynomials in monomials of lambda: with its sigmas in float64 the
        # algorithms agree to 1e-6 (1e-5 in the noise form, whose float32 sigmas enter through e^(2h)); in float32
        # that cancellation costs it up to ~1e-2 at orders 3-4 (noise form)
        ref = _sa_loop(theirs(), latents.double(), n, upcast=True)
        tight = 1e-6 if algorithm_type == "data_prediction" else 1e-5  # the noise form's e^(2h) noise scale
        assert rel_err(run_loop(ours(), latents.double(), n, generator_seed=3), ref) < tight, (cfg, tau, tau_range)
        ref32 = _sa_loop(theirs(), latents.clone(), n)
        ours32 = run_loop(ours(), latents.clone(), n, generator_seed=3)
        assert rel_err(ours32, ref32) < (1e-3 if max(p, c) <= 2 else 1e-2), (cfg, tau, tau_range)


def _sa_loop(s, x, n, upcast=False):
    from conftest import smooth_model

    s.set_timesteps(n)
    if upcast:
        s.sigmas = s.sigmas.double()
    g = torch.Generator().manual_seed(3)
    for t in s.timesteps:
        x = s.step(smooth_model(x, t), t, x, generator=g).prev_sample
    return x


def test_sa_solver_corrector_reuses_the_predictors_noise(latents):
    """The noise of step i enters twice: in the predictor of step i and in the corrector that redoes step i at the
    next call; fresh noise in the corrector changes the result, so diffusers' equality depends on the reuse."""
    from fastsample.solvers import SASolverScheduler

    s = SASolverScheduler(tau=1.0, tau_range=None)
    s.set_timesteps(6)
    zs = [torch.randn(latents.shape, generator=torch.Generator().manual_seed(10 + i)) for i in range(6)]
    x, seen = latents.clone(), []
    for t, z in zip(s.timesteps, zs):
        x = s.step(torch.zeros_like(x) + 0.1 * x, t, x, variance_noise=z).prev_sample
        seen.append(s._state.last_noise)
    assert all(a is b for a, b in zip(seen, zs))
    with pytest.raises(ValueError, match="tau_range must be None"):
        SASolverScheduler(tau_range=[800, 200]).set_timesteps(4)
    with pytest.raises(ValueError, match="predictor_order must be 1, 2, 3 or 4"):
        SASolverScheduler(predictor_order=5).set_timesteps(4)
