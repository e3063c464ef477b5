"""fastsample.sample: the direct loop, NFE accounting, callbacks, any scheduler."""
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from conftest import smooth_model
from fastsample import make_scheduler, sample
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.testbeds import GaussianMixture


@pytest.mark.parametrize("name", ["dpmsolver++", "deis", "unipc"])
def test_sample_counts_model_calls(name, latents):
    calls = []

    def model(x, t):
        calls.append(int(t))
        return smooth_model(x, t)

    x, nfe = sample(model, latents, scheduler=name, num_inference_steps=7, progress=False)
    assert nfe == 7 == len(calls) and x.shape == latents.shape and torch.isfinite(x).all()


def test_sample_with_a_diffusers_scheduler_and_callback(latents):
    seen = []

    def callback(i, t, x):
        seen.append(i)
        return x * 1.0 if i == 1 else None

    x, nfe = sample(smooth_model, latents, scheduler=EulerDiscreteScheduler(), num_inference_steps=4, callback=callback,
                    progress=False)
    assert nfe == 4 and seen == [0, 1, 2, 3]


def test_sample_custom_sigmas(latents):
    x, nfe = sample(smooth_model, latents, scheduler=make_scheduler("dpmsolver++"), sigmas=[14.6, 3.0, 0.5], progress=False)
    assert nfe == 3


def test_unknown_scheduler_name(latents):
    with pytest.raises(ValueError, match="scheduler name must be one of"):
        sample(smooth_model, latents, scheduler="lms")


def test_multistep_solvers_beat_ddim():
    """On the exact-score testbed, at 20 model calls on a logSNR grid, the multistep solvers are far closer to the
    exact ODE solution than DDIM (DPM-Solver++ order 1)."""
    vp = DiscreteVP(make_betas())
    gm = GaussianMixture.random(dim=8, components=4, seed=2, schedule=vp)
    noise = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = dict(final_sigmas_type="sigma_min", spacing="logsnr")
    s = make_scheduler("dpmsolver++", solver_order=1, **cfg)
    s.set_timesteps(20)
    sig0, sig1 = float(s.sigmas[0]), float(s.sigmas[-1])
    exact = gm.exact_solution(noise, sig0, sig1, 1 / (1 + sig0 ** 2) ** 0.5, 1 / (1 + sig1 ** 2) ** 0.5)
    errs = {}
    for label, sch in {"ddim": s, "dpm++2m": make_scheduler("dpmsolver++", **cfg),
                       "unipc3": make_scheduler("unipc", solver_order=3, **cfg),
                       "deis3": make_scheduler("deis", solver_order=3, **cfg)}.items():
        x, _ = sample(gm, noise, scheduler=sch, num_inference_steps=20, progress=False)
        errs[label] = float((x - exact).norm() / exact.norm())
    assert max(errs["dpm++2m"], errs["unipc3"], errs["deis3"]) < 0.3 * errs["ddim"], errs
