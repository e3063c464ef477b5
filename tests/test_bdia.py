"""BDIA: gamma 0 is diffusers' DDIM (and, on the Heun base, our Heun); the update and its inverse are exact; invert + regenerate round-trips x0 (float64
1e-10, float32 1e-5), in fastsample.sample and in a Stable Diffusion pipeline; bad input is named."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

import fastsample
from fastsample.guidance.cfg import PromptGuidance
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.solvers import BDIAScheduler
from fastsample.solvers.bdia import BDIA, Inversion
from fastsample.testbeds import GaussianMixture
from fastsample.zoo import SCHEDULER_CONFIG
from test_pipelines import PROMPT, SD_BETAS, SIZE, sd_components, sd_pipe  # noqa: F401  (a fixture)

F64 = torch.float64


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.image_like(64, seed=0, mean_scale=0.5, schedule=DiscreteVP(make_betas()))


@pytest.fixture(scope="module")
def v_mixture():
    return GaussianMixture.image_like(64, seed=0, mean_scale=0.5, schedule=DiscreteVP(make_betas()),
                                      prediction_type="v_prediction")


def noise(n=16, dtype=F64, seed=3):
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("config", [dict(), dict(set_alpha_to_one=False, steps_offset=1),
                                    dict(prediction_type="v_prediction")])
@pytest.mark.parametrize("n", [7, 10, 25])
def test_gamma_zero_is_diffusers_ddim(mixture, v_mixture, config, n):
    """With DDIM's default "leading" spacing (each step lands on the next timestep).  With "linspace" or "trailing"
    diffusers' DDIM steps to t - T // n and then calls the model at the next listed timestep, a level mismatch that
    BDIA does not copy: it steps to the next listed level (docs/differences.md)."""
    model = v_mixture if config.get("prediction_type") == "v_prediction" else mixture
    x = noise(dtype=torch.float32)
    ours = fastsample.sample(model, x, BDIAScheduler(**SCHEDULER_CONFIG | config, gamma=0.0), n, progress=False)[0]
    theirs = fastsample.sample(model, x, DDIMScheduler(**SCHEDULER_CONFIG | config, clip_sample=False), n,
                               progress=False)[0]
    assert float((ours - theirs).abs().max()) < 2e-5


def test_step_and_unstep_are_exact_inverses():
    sch = BDIAScheduler(**SCHEDULER_CONFIG, gamma=0.7)
    sch.set_timesteps(12)
    g, solver = sch.grid, BDIA(0.7)
    gen = torch.Generator().manual_seed(0)
    x_prev, x, d = (torch.randn(4, 9, generator=gen, dtype=F64) for _ in range(3))
    state = solver.init(g)
    state = type(state)(index=5, last_x=x_prev)
    x_next, _ = solver.step(g, state, x.clone(), d)
    cp, cx, cd = solver.coefficients(g, 5, first=False)
    assert torch.allclose(x_next, cp * x_prev + cx * x + cd * d, rtol=0, atol=1e-14)
    assert torch.allclose(solver.unstep(g, 5, x, x_next, d), x_prev, rtol=0, atol=1e-12)


def test_heun_base_step_and_unstep_are_exact_inverses():
    """The two-stage step: the first call returns DDIM's first-stage sample, the second the BDIA-Heun update, which
    is linear in (x_{i-1}, x_i, D_i, D'); unstep recovers x_{i-1} from it."""
    sch = BDIAScheduler(**SCHEDULER_CONFIG, gamma=0.7, base="heun")
    sch.set_timesteps(12)
    g, solver = sch.grid, BDIA(0.7, "heun")
    gen = torch.Generator().manual_seed(0)
    x_prev, x, d, d2 = (torch.randn(4, 9, generator=gen, dtype=F64) for _ in range(4))
    state = type(solver.init(g))(index=5, last_x=x_prev)
    x_stage, state = solver.step(g, state, x.clone(), d)
    fx, fd = g.sigma[6] / g.sigma[5], g.alpha[6] - g.alpha[5] * g.sigma[6] / g.sigma[5]
    assert state.index == 5 and torch.allclose(x_stage, fx * x + fd * d, rtol=0, atol=1e-14)
    x_next, state = solver.step(g, state, x_stage, d2)
    cp, cx, cd = solver.coefficients(g, 5, first=False)
    c = solver.stage_coefficient(g, 5, first=False)
    assert state.index == 6 and torch.equal(state.last_x, x) and state.stage == ()
    assert torch.allclose(x_next, cp * x_prev + cx * x + cd * d + c * (d - d2), rtol=0, atol=1e-13)
    assert torch.allclose(solver.unstep(g, 5, x, x_next, d, d2), x_prev, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="step 5 has two stages: pass stage_pred"):
        solver.unstep(g, 5, x, x_next, d)


def test_heun_base_at_gamma_zero_is_heun(mixture):
    """On the scheduler's grid, through the scheduler: gamma 0 on the Heun base is our Heun solver (itself equal to
    diffusers' HeunDiscreteScheduler, tests/test_equality.py) with the same 2N - 1 calls."""
    from fastsample.sampling import integrate
    from fastsample.solvers import Heun

    x = noise()
    for n in (5, 12):
        sch = BDIAScheduler(**SCHEDULER_CONFIG, gamma=0.0, base="heun")
        ours, nfe = fastsample.sample(mixture, x, sch, n, progress=False)
        heun = integrate(mixture, x.clone(), Heun(), sch.grid, "epsilon")
        assert nfe == 2 * n - 1 and float((ours - heun).abs().max()) < 1e-12
    assert BDIAScheduler(base="heun").order == 2 and BDIAScheduler().order == 1


@pytest.mark.parametrize("base", ["ddim", "heun"])
@pytest.mark.parametrize("gamma", [1.0, 0.95])
@pytest.mark.parametrize("n", [10, 20, 50])
def test_round_trip_float64_and_float32(mixture, base, gamma, n):
    calls = n if base == "ddim" else 2 * n - 1
    # float32: the float64 chain kept between steps (keeps_exact_samples) leaves only x0's own float32 rounding
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-7)):
        sch = BDIAScheduler(**SCHEDULER_CONFIG, gamma=gamma, base=base)
        x0 = mixture.sample_data(8, torch.Generator().manual_seed(1)).to(dtype)
        inv = fastsample.invert(mixture, x0, sch, n)
        assert isinstance(inv, Inversion) and inv.latents.dtype == dtype and inv.num_inference_steps == n
        sch.load_inversion(inv)
        back, nfe = fastsample.sample(mixture, inv.latents, sch, n, progress=False)
        assert nfe == calls and float((back - x0).norm() / x0.norm()) < tol, (dtype, gamma, n)
        # the load is consumed: a second run is a plain BDIA sample (its first step a DDIM step)
        again = fastsample.sample(mixture, inv.latents, sch, n, progress=False)[0]
        assert float((again - x0).norm() / x0.norm()) > 10 * tol


def test_the_float64_chain_is_kept_only_while_the_pipeline_hands_it_back(mixture):
    """A float32 run continues from the step's own float64 result wherever the sample it is handed rounds to it, and
    from the sample itself where the pipeline changed it, element by element."""
    sch = BDIAScheduler(**SCHEDULER_CONFIG, gamma=1.0)
    sch.set_timesteps(10)
    x = noise(4, torch.float32)
    t = sch.timesteps[0]
    prev = sch.step(mixture(x, t), t, x).prev_sample
    exact = sch._exact
    assert exact.dtype == F64 and torch.equal(exact.float(), prev) and not torch.equal(exact, prev.double())
    assert torch.equal(sch._exact_sample(prev, F64), exact)
    changed = prev.clone()
    changed[0] += 1e-3  # a pipeline that changed one sample's latents (an inpainting blend)
    kept = sch._exact_sample(changed, F64)
    assert torch.equal(kept[0], changed[0].double()) and torch.equal(kept[1:], exact[1:])
    sch.set_timesteps(10)
    assert sch._exact is None


def test_restart_between_the_stages_of_a_step_waits_for_the_step(mixture):
    """T-Stitch restarts the history when its model changes, which can fall between Heun's two calls: the step in
    progress keeps its first stage, and the restart applies from the next step (no BDIA memory there)."""
    def run(restart_at):
        sch = BDIAScheduler(**SCHEDULER_CONFIG, gamma=0.5, base="heun")
        sch.set_timesteps(4)
        x, state = noise(2), None
        for j, t in enumerate(sch.timesteps):
            if j == restart_at:
                sch.restart_history()
            x = sch.step(mixture(x, t), t, x).prev_sample
            if j == restart_at:
                state = sch._state
        return x, state

    plain, _ = run(None)
    between, state = run(3)  # calls (0,0) (1,0) (1,1) (2,1): call 3 is step 1's second stage
    assert state.index == 2 and state.last_x is None and state.stage == ()  # restarted when step 1 ended
    at_step, _ = run(4)  # a restart at step 2's first call: the same run
    assert torch.equal(between, at_step) and not torch.equal(between, plain)


def test_loaded_inversion_regenerates_from_the_first_step_only(mixture):
    sch = BDIAScheduler(**SCHEDULER_CONFIG, gamma=1.0)
    x0 = mixture.sample_data(2, torch.Generator().manual_seed(1))
    inv = fastsample.invert(mixture, x0, sch, 6)
    sch.set_timesteps(6)
    x, t = inv.latents, sch.timesteps[0]
    x = sch.step(mixture(x, t), t, x).prev_sample
    sch.load_inversion(inv)
    t = sch.timesteps[1]
    with pytest.raises(ValueError, match="regenerates from the first step; this call is step 1"):
        sch.step(mixture(x, t), t, x)


def test_ddim_inversion_is_not_exact_where_bdia_is(mixture):
    """The anchor: diffusers' DDIMInverseScheduler + DDIMScheduler round trip at 10 steps errs by far more."""
    from diffusers import DDIMInverseScheduler

    x0 = mixture.sample_data(8, torch.Generator().manual_seed(1))
    inv_s = DDIMInverseScheduler(**SCHEDULER_CONFIG, clip_sample=False)
    z = fastsample.sample(mixture, x0, inv_s, 10, progress=False)[0]
    back = fastsample.sample(mixture, z, DDIMScheduler(**SCHEDULER_CONFIG, clip_sample=False), 10, progress=False)[0]
    ddim_err = float((back - x0).norm() / x0.norm())
    sch = BDIAScheduler(**SCHEDULER_CONFIG, gamma=1.0)
    inv = fastsample.invert(mixture, x0, sch, 10)
    sch.load_inversion(inv)
    bdia_err = float((fastsample.sample(mixture, inv.latents, sch, 10, progress=False)[0] - x0).norm() / x0.norm())
    assert bdia_err < 1e-12 and ddim_err > 1e-3


@pytest.mark.parametrize("base", ["ddim", "heun"])
def test_flow_model_round_trip(base):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastsample.schedules import RectifiedFlow

    gm = GaussianMixture.random(dim=4, components=3, seed=1, schedule=RectifiedFlow(t_min=0.0),
                                prediction_type="flow_prediction", time_scale=1000.0)
    sch = BDIAScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, gamma=1.0, base=base)
    x0 = gm.sample_data(6, torch.Generator().manual_seed(2))
    inv = fastsample.invert(gm, x0, sch, 12)
    sch.load_inversion(inv)
    back = fastsample.sample(gm, inv.latents, sch, 12, progress=False)[0]
    assert float((back - x0).norm() / x0.norm()) < 1e-10


@pytest.mark.parametrize("guidance_scale, base", [(1.0, "ddim"), (3.0, "ddim"), (3.0, "heun")])
def test_stable_diffusion_pipeline_round_trip_and_edit(sd_components, guidance_scale, base):  # noqa: F811
    """Invert latents with prompt A through the pipeline's own guided UNet, regenerate in the pipeline: the latents
    come back to 1e-6 (float32).  With prompt B (the edit) the pipeline runs from the same inversion."""
    sch = BDIAScheduler(**SD_BETAS, steps_offset=1, set_alpha_to_one=False, gamma=1.0, base=base)
    pipe = sd_pipe(sd_components, sch)
    x0 = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0)) * 0.8
    model = PromptGuidance.from_pipeline(pipe, PROMPT, guidance_scale)
    with torch.no_grad():
        inv = fastsample.invert(model, x0, pipe.scheduler, 10)
        pipe.scheduler.load_inversion(inv)
        back = pipe(PROMPT, latents=inv.latents, num_inference_steps=10, guidance_scale=guidance_scale,
                    height=SIZE, width=SIZE, output_type="latent").images
        assert float((back - x0).norm() / x0.norm()) < 1e-6
        pipe.scheduler.load_inversion(inv)
        edit = pipe("a dog", latents=inv.latents, num_inference_steps=10, guidance_scale=guidance_scale,
                    height=SIZE, width=SIZE, output_type="latent").images
    assert torch.isfinite(edit).all() and float((edit - x0).norm() / x0.norm()) > 1e-4


@pytest.mark.parametrize("build, call, match", [
    (lambda: BDIAScheduler(gamma=1.5), None, r"gamma must be a number in \[0, 1\]"),
    (lambda: BDIAScheduler(gamma=math.nan), None, "gamma must be"),
    (lambda: BDIAScheduler(base="dpm"), None, r"base must be one of \('ddim', 'heun'\) .*got 'dpm'"),
    (lambda: BDIAScheduler(clip_sample=True, clip_sample_range=0.0), None, "clip_sample_range must be"),
    (lambda: BDIAScheduler(gamma=0.0), lambda s, m, x: fastsample.invert(m, x, s, 10), "not exactly invertible"),
    (lambda: DDIMScheduler(), lambda s, m, x: fastsample.invert(m, x, s, 10), "invert needs a BDIAScheduler"),
    (lambda: BDIAScheduler(), lambda s, m, x: fastsample.invert(m, x, s, 1), "must be >= 2 to invert"),
    (lambda: BDIAScheduler(dualfast=0.3), lambda s, m, x: fastsample.invert(m, x, s, 10), "without .*dualfast"),
    (lambda: BDIAScheduler(), lambda s, m, x: s.load_inversion(x), "takes the Inversion"),
    (lambda: BDIAScheduler(set_alpha_to_one=False), lambda s, m, x: s.set_timesteps(10), "steps_offset=1"),
])
def test_bad_input_is_named(mixture, build, call, match):
    with pytest.raises(ValueError, match=match):
        s = build()
        call(s, mixture, noise(2))


def test_loaded_inversion_must_match_the_run(mixture):
    sch = BDIAScheduler(**SCHEDULER_CONFIG, gamma=1.0)
    x0 = mixture.sample_data(2, torch.Generator().manual_seed(1))
    inv = fastsample.invert(mixture, x0, sch, 8)
    sch.load_inversion(inv)
    with pytest.raises(ValueError, match="has 8 steps, this run 9"):
        fastsample.sample(mixture, inv.latents, sch, 9, progress=False)
    sch.load_inversion(inv)
    with pytest.raises(ValueError, match="not the loaded inversion's latents"):
        fastsample.sample(mixture, inv.latents + 1, sch, 8, progress=False)
    with pytest.raises(ValueError, match="made with gamma=1.0"):
        BDIAScheduler(**SCHEDULER_CONFIG, gamma=0.5).load_inversion(inv)
    with pytest.raises(ValueError, match="made with base='ddim'"):
        BDIAScheduler(**SCHEDULER_CONFIG, gamma=1.0, base="heun").load_inversion(inv)
