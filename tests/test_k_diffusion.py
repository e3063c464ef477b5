"""fastsample.k_diffusion: the registered solvers in k-diffusion's calling convention.  Equal to k-diffusion's
sample_euler, sample_heun, sample_dpmpp_2m and sample_dpmpp_2m_sde (the same Brownian noise) on the exact testbed
and on a small UNet; every deterministic registered solver equal to its own scheduler on the same grid."""

import pytest
import torch

from fastsample import k_diffusion as F
from fastsample.k_diffusion import import_k_diffusion_sampling
from fastsample.registry import make_scheduler, variants
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.testbeds import GaussianMixture

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def K():
    """k-diffusion's sampling module, imported alone: its package __init__ imports training extras (wandb, clip)
    that the test environment does not install."""
    module = import_k_diffusion_sampling()
    if module is None:
        pytest.skip("k-diffusion is not installed (make install adds it: pip install --no-deps k-diffusion)")
    return module


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture.random(dim=16, components=3, seed=2, spread=1.5, schedule=DiscreteVP(make_betas()))


def denoiser_of(gm):
    return lambda x, sigma: gm.denoise(x, float(sigma.reshape(-1)[0]))


@pytest.fixture(scope="module")
def unet_denoiser():
    """A small random UNet2DModel (epsilon prediction on diffusers' linear betas) as a VE denoiser, the way
    k-diffusion wraps a discrete VP model: input x / sqrt(1 + sigma^2) at the model time of sigma."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).double().eval()
    vp = DiscreteVP(make_betas())

    @torch.no_grad()
    def denoise(x, sigma):
        s = float(sigma.reshape(-1)[0])
        t = float(vp.t_from_sigma_ve(torch.tensor(s, dtype=F64)))
        eps = unet(x / (1 + s * s) ** 0.5, t).sample
        return x - s * eps

    return denoise


def karras(n, lo=0.03, hi=80.0):
    ramp = torch.linspace(0, 1, n, dtype=F64)
    s = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    return torch.cat([s, s.new_zeros(1)])


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


CASES = ["testbed", "unet"]


def problem(case, gm, unet_denoiser):
    g = torch.Generator().manual_seed(4)
    if case == "testbed":
        return denoiser_of(gm), torch.randn(6, 16, generator=g, dtype=F64) * 80, karras(12)
    return unet_denoiser, torch.randn(2, 1, 8, 8, generator=g, dtype=F64) * 80, karras(8)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_deterministic_samplers_equal_k_diffusion(K, gm, unet_denoiser, case, name):
    model, x, sigmas = problem(case, gm, unet_denoiser)
    ref = getattr(K, f"sample_{name}")(model, x.clone(), sigmas, disable=True)
    ours = getattr(F, f"sample_{name}")(model, x.clone(), sigmas, disable=True)
    assert rel(ours, ref) < 1e-5


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name, solver_type", [("dpmpp_2m_sde", "midpoint"), ("dpmpp_2m_sde", "heun"),
                                               ("dpmpp_3m_sde", None)])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_sde_samplers_equal_k_diffusion_with_the_same_brownian_noise(K, gm, unet_denoiser, case, name, solver_type,
                                                                     eta):
    model, x, sigmas = problem(case, gm, unet_denoiser)
    kw = {} if solver_type is None else {"solver_type": solver_type}
    runs = []
    for fn in (getattr(K, f"sample_{name}"), getattr(F, f"sample_{name}")):
        noise = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=7)
        runs.append(fn(model, x.clone(), sigmas, disable=True, noise_sampler=noise, eta=eta, **kw))
    assert rel(runs[1], runs[0]) < 1e-5


def test_heun_with_churn_equals_k_diffusion(K, gm):
    model, x, sigmas = denoiser_of(gm), torch.randn(6, 16, dtype=F64) * 80, karras(10)
    torch.manual_seed(3)
    ref = K.sample_heun(model, x.clone(), sigmas, disable=True, s_churn=2.0, s_tmin=0.1, s_tmax=20.0)
    torch.manual_seed(3)
    ours = F.sample_heun(model, x.clone(), sigmas, disable=True, s_churn=2.0, s_tmin=0.1, s_tmax=20.0)
    assert rel(ours, ref) < 1e-5


# DEIS-tab's polynomial is in the schedule's time: in k-diffusion's convention that is sigma (as ComfyUI's DEIS),
# on the scheduler's VP grid it is the VP time, so the two are different methods there (tested apart below)
DETERMINISTIC = [name for name, (info, v) in variants().items() if v.order is not None and "tab" not in name]


@pytest.mark.parametrize("extra", [{}, {"dualfast": 0.5}], ids=["plain", "dualfast"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_solver_equals_its_scheduler_on_the_same_grid(gm, name, extra):
    """The k-diffusion function of a registered solver, with a VE denoiser, equals the solver's scheduler (VP
    parameterization, the same model) on the scheduler's own grid: the exponential integrators do not depend on
    the parameterization.  With DualFast too: its mix is in the noise prediction at the current sample, which both
    share."""
    sch = make_scheduler(name, final_sigmas_type="zero", beta_start=0.0001, beta_end=0.02, **extra)  # testbed betas
    sch.set_timesteps(9)
    g = sch.grid
    sigmas = torch.tensor([s / a for a, s in zip(g.alpha, g.sigma)], dtype=F64)
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = z.clone()
    for t in sch.timesteps:
        y = sch.step(gm(y, t), t, y).prev_sample
    ours = F.sample(name, denoiser_of(gm), z / g.alpha[0], sigmas, disable=True, final_sigmas_type="zero", **extra)
    assert rel(ours, y) < 1e-9, name


def test_callback_sees_every_step_and_options_reach_the_solver(gm):
    seen = []
    model, x, sigmas = denoiser_of(gm), torch.randn(3, 16, dtype=F64) * 80, karras(6)
    F.sample_unipc3(model, x, sigmas, callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == list(range(6)) and set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert float(seen[2]["sigma"]) == pytest.approx(float(sigmas[2]))
    a = F.sample("unipc", model, x, sigmas, solver_order=1, disable=True)
    b = F.sample("unipc1", model, x, sigmas, disable=True)
    assert torch.equal(a, b)


def test_flow_models_in_comfyui_const_convention():
    """model_type="const": x = (1 - sigma) x0 + sigma eps, sigma from 1; the solvers take the flow's log-SNR and
    converge to the exact flow solution (the testbed on a rectified-flow schedule)."""
    from fastsample.schedules import RectifiedFlow

    flow = GaussianMixture.random(dim=8, components=2, seed=5, spread=1.0, schedule=RectifiedFlow(t_min=0.0))

    def model(x, sigma):
        s = float(sigma.reshape(-1)[0])
        return flow.denoise(x / (1 - s), s / (1 - s)) if s < 1 else flow.moments()[0].expand_as(x)

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = flow.exact_solution(x * 0.999, 0.999 / 0.001, 0.0, alpha_from=0.001)

    def err(name, n, **kw):
        sig = torch.cat([torch.linspace(0.999, 0.002, n, dtype=F64), torch.zeros(1, dtype=F64)])
        return rel(F.sample(name, model, x * 0.999, sig, model_type="const", disable=True, **kw), exact)

    for name in ("dpm++2m", "unipc3", "deis-tab3"):
        assert err(name, 40) < 0.2 * err(name, 10), name
    full = torch.cat([torch.linspace(1.0, 0.01, 10, dtype=F64), torch.zeros(1, dtype=F64)])  # from pure noise
    for name in ("unipc3", "deis-tab3", "dpm++2m"):
        assert torch.isfinite(F.sample(name, model, x, full, model_type="const", disable=True)).all(), name


def test_bad_input_is_an_error(gm):
    model = denoiser_of(gm)
    x = torch.randn(2, 16, dtype=F64)
    with pytest.raises(ValueError, match="sigmas must be strictly decreasing"):
        F.sample_dpmpp_2m(model, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="model_type must be one of"):
        F.sample_dpmpp_2m(model, x, karras(4), model_type="vp")
    with pytest.raises(ValueError, match=r"CONST \(flow\) sigmas must lie in \[0, 1\]"):
        F.sample_dpmpp_2m(model, x, karras(4), model_type="const")
    with pytest.raises(ValueError, match="scheduler name must be one of"):
        F.sample("nope", model, x, karras(4))
    with pytest.raises(ValueError, match="s_noise must be a finite number"):
        F.sample_dpmpp_2m_sde(model, x, karras(4), s_noise=float("nan"))
    with pytest.raises(ValueError, match=r"scales must be 4 numbers in \(0, 10\]"):
        F.sample_unipc3(model, x, karras(4), scales=[1.0, 1.0])
    with pytest.raises(ValueError, match="denoised output contains NaN"):
        F.sample_unipc3(lambda x, s: x * float("nan"), x, karras(4))


def test_default_brownian_noise_is_consistent_across_step_counts(gm):
    """Without a noise_sampler the SDE samplers draw Brownian-tree noise over sigma from extra_args' seed: the same
    seed gives the same Brownian path, so a finer grid converges to the coarse one's sample path."""
    model = denoiser_of(gm)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=F64) * 80
    seeded = lambda y, s, seed: model(y, s)  # noqa: E731  (the seed is for the sampler; the model ignores it)
    runs = {n: F.sample_dpmpp_2m_sde(seeded, x, karras(n), extra_args={"seed": 5}, disable=True)
            for n in (40, 80, 160)}
    d1, d2 = rel(runs[80], runs[160]), rel(runs[40], runs[160])
    assert d1 < d2 < 0.5, (d1, d2)


def test_dpm_adaptive_in_both_conventions(gm):
    from fastsample.schedules import RectifiedFlow

    model = denoiser_of(gm)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=F64) * 80
    exact = gm.exact_solution(x, 80.0, 0.002)
    y, info = F.sample_dpm_adaptive(model, x, 0.002, 80.0, rtol=0.005, atol=0.0008, return_info=True, disable=True)
    assert rel(y, exact) < 2e-3 and info["nfe"] == info["n_accept"] and len(info["sigmas"]) == info["n_accept"] + 1
    flow = GaussianMixture.random(dim=8, components=2, seed=5, spread=1.0, schedule=RectifiedFlow(t_min=0.0))
    const = lambda y, s: flow.denoise(y / (1 - float(s[0])), float(s[0]) / (1 - float(s[0])))  # noqa: E731
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.99
    ref = flow.exact_solution(z, 0.99 / 0.01, 0.002 / 0.998, alpha_from=0.01) * 0.998
    y, info = F.sample_dpm_adaptive(const, z, 0.002, 0.99, rtol=0.002, atol=0.0003, return_info=True, disable=True,
                                    model_type="const")
    assert rel(y, ref) < 5e-3 and info["sigmas"][0] == pytest.approx(0.99)
    with pytest.raises(ValueError, match="sigma_max < 1"):
        F.sample_dpm_adaptive(const, z, 0.002, 1.0, model_type="const")


def test_heun_scheduler_equals_diffusers_heun():
    """The registered Heun (solvers/heun.py) against diffusers' HeunDiscreteScheduler on the same grid (custom and
    "trailing" timesteps; diffusers' default "linspace" grid has N fractional timesteps, ours the multistep
    schedulers' rounded one).  diffusers starts from sigma_max * noise in its VE variables, ours from the same
    point in VP ones; float32 sigmas in diffusers leave 1e-7."""
    from diffusers import HeunDiscreteScheduler

    from fastsample.solvers import HeunScheduler

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    gm = GaussianMixture.random(dim=16, components=3, seed=2, spread=1.5,
                                schedule=DiscreteVP(make_betas(1000, **betas)))
    z = torch.randn(4, 16, dtype=F64, generator=torch.Generator().manual_seed(0))
    for kw in ({"timesteps": [999, 800, 600, 400, 200, 50]}, {"num_inference_steps": 8}):
        ref, ours = HeunDiscreteScheduler(**betas, timestep_spacing="trailing"), HeunScheduler(**betas, timestep_spacing="trailing")
        ref.set_timesteps(**kw)
        ours.set_timesteps(**kw)
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
        x = z * ref.init_noise_sigma
        for t in ref.timesteps:
            x = ref.step(gm(ref.scale_model_input(x, t), t), t, x).prev_sample
        y = z * ref.init_noise_sigma / (1 + float(ref.sigmas[0]) ** 2) ** 0.5
        for t in ours.timesteps:
            y = ours.step(gm(y, t), t, y).prev_sample
        assert rel(y, x) < 1e-6, kw
