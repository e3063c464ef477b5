"""Feynman-Kac correctors: exact component weights on testbeds, the SDE step is our scheduler's, resampling, errors."""
import math

import pytest
import torch
from diffusers import UNet2DModel

from fastsample import sample
from fastsample.guidance.fkc import FKCSampler, effective_sample_size, resample_indices
from fastsample.schedules import DiscreteVP
from fastsample.solvers import DPMSolverPlusPlus, DPMSolverPlusPlusScheduler
from fastsample.solvers.euler_maruyama import EulerMaruyama
from fastsample.solver import Grid
from fastsample.testbeds import GaussianMixture, fkc_case


def _tv(target, dim, seed=0, particles=2000, steps=200, **kw):
    models, exact, options, call = fkc_case(target, dim)
    g = torch.Generator().manual_seed(seed)
    out = FKCSampler(models, target, **{**options, **kw}).sample(
        torch.randn(particles, dim, generator=g, dtype=torch.float64), steps, generator=g, **call)
    return 0.5 * float((exact.component_shares(out.samples, out.weights) - exact.weights).abs().sum())


# ------------------------------------------------------------------------------------------- exactness on testbeds
@pytest.mark.parametrize("target,dim", [("product", 2), ("product", 16), ("anneal", 2), ("cfg", 2)])
def test_fkc_recovers_exact_component_weights(target, dim):
    """2,000 particles: FKC within TV 0.05 of the exact target's component weights; the same SDE without weights
    (sum of scores / plain CFG) off by at least 0.1."""
    assert _tv(target, dim) < 0.05
    assert _tv(target, dim, weighted=False) > 0.1


def test_product_of_mixtures_is_exact():
    """GaussianMixture.product against the pointwise product of densities, normalised by quadrature on a grid."""
    (p1, p2), exact, _, _ = fkc_case("product", 2)
    xs = torch.linspace(-9, 12, 301, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    logp = p1.log_density(pts, 0.0) + p2.log_density(pts, 0.0)
    cell = (xs[1] - xs[0]) ** 2
    lognorm = torch.logsumexp(logp, 0) + math.log(cell)
    assert torch.allclose(logp - lognorm, exact.log_density(pts, 0.0), atol=1e-6)


def test_geometric_mean_and_annealed_weights():
    """Separated-limit weights: the integral of each component's product of powers, by quadrature."""
    _, exact, _, _ = fkc_case("cfg", 2)
    assert torch.allclose(exact.weights, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64), atol=1e-12)
    _, annealed, _, _ = fkc_case("anneal", 2)
    # w^2 / sqrt(|S|) for weights 0.3 / 0.7 and covariances 0.5 I / 1.5 I
    raw = torch.tensor([0.09 / 0.5, 0.49 / 1.5], dtype=torch.float64)
    assert torch.allclose(annealed.weights, raw / raw.sum(), atol=1e-12)
    assert torch.allclose(annealed.covs[0], 0.25 * torch.eye(2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- the SDE and weights
def _mixture(dim=3):
    return GaussianMixture.random(dim, 3, seed=1, schedule=DiscreteVP.from_betas_config())


@pytest.mark.parametrize("target,kw", [("cfg", {"guidance_scale": 1.0}), ("anneal", {"beta": 1.0})])
def test_trivial_target_is_the_plain_sde(target, kw):
    """Guidance 1 and beta 1 carry no weights: the particles are exactly our SDE-DPM-Solver++ scheduler's samples."""
    model = _mixture()
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    call = {"uncond": {}} if target == "cfg" else {}
    out = FKCSampler(model, target, **kw).sample(noise, 12, generator=torch.Generator().manual_seed(5), **call)
    sched = DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    ref, _ = sample(model, noise, sched, 12, progress=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out.log_weights, torch.zeros(64, dtype=torch.float64))
    assert not out.resampled.any()
    assert torch.allclose(out.samples, ref, atol=1e-6)


def test_weight_rates_match_closed_forms():
    """combine() against the formulas in eps form, with and without the tracking drift."""
    model = _mixture()
    x = torch.randn(5, 3, dtype=torch.float64)
    e1, e2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    s = FKCSampler([model, model], "product", sigma_data=None)
    eps, rate = s.combine([e1, e2], x, 0.6, 0.8)
    assert torch.allclose(eps, e1 + e2) and torch.allclose(rate, 2 * (e1 * e2).sum(1))
    s = FKCSampler(model, "cfg", guidance_scale=3.0)
    eps, rate = s.combine([e1, e2], x, 0.6, 0.8)
    assert torch.allclose(eps, e1 + 3 * (e2 - e1)) and torch.allclose(rate, 6 * ((e2 - e1) ** 2).sum(1))
    s = FKCSampler(model, "anneal", beta=2.0, sigma_data=0.5)
    eps, rate = s.combine([e1], x, 0.6, 0.8)
    r = 0.8 / (0.64 + 0.36 * 0.25)
    assert torch.allclose(eps, 2 * e1 - r / 2 * x)
    assert torch.allclose(rate, 2 * (e1 ** 2).sum(1) - r * (x * 2 * e1).sum(1))
    # noise-dominated x (alpha -> 0, eps_1 = x / sigma): the tracked rate has no |x|^2 term left
    _, rate = s.combine([x / 0.999], x, 1e-9, 0.999)
    assert rate.abs().max() < 1e-6


def test_euler_maruyama_rule():
    """EM's drift equals first-order SDE-DPM-Solver++'s; its noise is the forward increment sqrt(s^2 - s'^2)."""
    vp = DiscreteVP.from_betas_config()
    grid = Grid.from_times(vp, torch.tensor([900.0, 500.0, 100.0], dtype=torch.float64))
    for i in range(2):
        em = EulerMaruyama().rule(grid, i, 1)
        dpm = DPMSolverPlusPlus(1, algorithm_type="sde-dpmsolver++").rule(grid, i, 1)
        assert math.isclose(em.cx, dpm.cx, rel_tol=1e-12) and math.isclose(em.coefs[0], dpm.coefs[0], rel_tol=1e-12)
        s0, s1 = grid.sigma[i] / grid.alpha[i], grid.sigma[i + 1] / grid.alpha[i + 1]
        assert math.isclose(em.noise, grid.alpha[i + 1] * math.sqrt(s0 ** 2 - s1 ** 2), rel_tol=1e-12)


def test_euler_maruyama_samples_a_gaussian():
    """Many EM steps from pure noise reproduce a Gaussian testbed's mean and variance."""
    mean, var = torch.tensor([1.0, -0.5]), torch.tensor([0.3, 2.0])
    model = GaussianMixture.gaussian(mean, torch.diag(var), schedule=DiscreteVP.from_betas_config())
    g = torch.Generator().manual_seed(0)
    out = FKCSampler(model, "anneal", beta=1.0, step="euler-maruyama").sample(
        torch.randn(10000, 2, generator=g, dtype=torch.float64), 200, generator=g)
    assert torch.allclose(out.samples.mean(0), mean.double(), atol=0.05)
    assert torch.allclose(out.samples.var(0), var.double(), rtol=0.06)


# ------------------------------------------------------------------------------------------- resampling
def test_resampling_schemes():
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # systematic: each count is floor or ceil of N w
        idx = resample_indices(w, "systematic", g)
        counts = torch.stack([torch.bincount(r, minlength=4) for r in idx]).double()
        assert ((counts - 4 * w).abs() < 1).all()
    for method in ("multinomial", "stratified", "systematic"):
        idx = torch.cat([resample_indices(w, method, g) for _ in range(4000)], 1)
        freq = torch.stack([torch.bincount(r, minlength=4) for r in idx]).double() / idx.shape[1]
        assert torch.allclose(freq, w, atol=0.01), method
        again = resample_indices(w, method, torch.Generator().manual_seed(3))
        assert torch.equal(again, resample_indices(w, method, torch.Generator().manual_seed(3)))
    assert torch.allclose(effective_sample_size(torch.log(w)), 1 / (w * w).sum(1))


@pytest.mark.parametrize("resampling", ["systematic", "multinomial", "stratified"])
def test_deterministic_per_seed_and_chunking(resampling):
    model = _mixture()
    noise = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))

    def run(seed, **kw):
        s = FKCSampler([model, model], "product", resampling=resampling, **kw)
        return s.sample(noise, 15, generator=torch.Generator().manual_seed(seed), num_particles=20)

    a, b, c = run(1), run(1, chunk_size=7), run(2)
    assert a.resampled.any()
    assert torch.equal(a.samples, b.samples) and torch.equal(a.log_weights, b.log_weights)
    assert not torch.equal(a.samples, c.samples)
    assert a.ess.shape == (15, 2) and a.weights.reshape(2, 20).sum(1).allclose(torch.ones(2, dtype=torch.float64))
    assert a.select(torch.Generator().manual_seed(0)).shape == (2, 3)


def test_groups_resample_within_themselves():
    """Per-particle keyword tensors follow resampling, and a group's particles never leave it."""
    model, G, N = _mixture(), 3, 8
    labels = torch.arange(G).repeat_interleave(N)
    seen = []

    def tagged(x, t, group):
        seen.append(group.clone())
        return model(x, t)

    out = FKCSampler([tagged, model], "product").sample(
        torch.randn(G * N, 3, generator=torch.Generator().manual_seed(0)), 15,
        generator=torch.Generator().manual_seed(1), num_particles=N, group=labels)
    assert out.resampled.any()
    assert all(torch.equal(s, labels) for s in seen)


# ------------------------------------------------------------------------------------------- diffusers models
def test_class_conditional_unet_fkc_cfg():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, num_class_embeds=3, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    labels = torch.tensor([0, 1]).repeat_interleave(4)
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        s = FKCSampler(unet, "cfg", guidance_scale=3.0, **kw)
        with torch.no_grad():
            return s.sample(noise, 6, generator=torch.Generator().manual_seed(0), num_particles=4,
                            uncond={"class_labels": torch.full_like(labels, 2)}, class_labels=labels)

    out, chunked = run(), run(chunk_size=3)
    assert out.samples.shape == noise.shape and torch.isfinite(out.samples).all()
    assert torch.allclose(out.samples, chunked.samples, rtol=1e-4, atol=1e-4)
    assert out.log_weights.abs().sum() > 0 or out.resampled.any()


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,kw,match", [
    ((["m"], "tempering"), {}, "target must be one of"),
    (([None, None], "anneal"), {"beta": 2.0}, "takes 1 callable"),
    (([None], "product"), {}, "takes 2 callable"),
    (([None], "anneal"), {"beta": 0.0}, "beta > 0"),
    (([None], "anneal"), {"beta": -1.0}, "beta > 0"),
    (([None], "anneal"), {}, "beta > 0"),
    (([None], "cfg"), {}, "guidance_scale"),
    (([None], "cfg"), {"guidance_scale": 2.0, "ess_threshold": 0.0}, "ess_threshold"),
    (([None], "cfg"), {"guidance_scale": 2.0, "ess_threshold": 1.5}, "ess_threshold"),
    (([None], "cfg"), {"guidance_scale": 2.0, "resampling": "residual"}, "resampling must be one of"),
    (([None], "cfg"), {"guidance_scale": 2.0, "step": "heun"}, "step must be one of"),
    (([None], "cfg"), {"guidance_scale": 2.0, "sigma_data": -1.0}, "sigma_data"),
    (([None], "cfg"), {"guidance_scale": 2.0, "chunk_size": 0}, "chunk_size"),
])
def test_bad_input(args, kw, match):
    models, target = args
    models = [(lambda x, t: x) if m is None else m for m in models]
    with pytest.raises(ValueError, match=match):
        FKCSampler(models, target, **kw)


def test_bad_sample_input():
    s = FKCSampler(_mixture(), "cfg", guidance_scale=2.0)
    with pytest.raises(ValueError, match="num_particles"):
        s.sample(torch.randn(10, 3), 5, num_particles=3, uncond={})
    with pytest.raises(ValueError, match="uncond"):
        s.sample(torch.randn(10, 3), 5)


@pytest.mark.parametrize("target", ["product", "anneal", "cfg"])
def test_fkc_on_a_flow_schedule(target):
    """The same exactness on rectified flow: flow-prediction testbeds, the weights on the flow schedule's lambdas,
    a grid from one training step below sigma = 1; a grid that starts at sigma = 1 (scores carry nothing there) is
    a clear error."""
    from fastsample import zoo
    from fastsample.schedules import RectifiedFlow
    from fastsample.solvers import DPMSolverPlusPlusScheduler
    from fastsample.testbeds import ConditionalPair

    models, exact, options, call = fkc_case(target, 2, schedule=RectifiedFlow(t_min=0.0))
    for m in models:
        for part in ([m.uncond_model, m.cond_model] if isinstance(m, ConditionalPair) else [m]):
            part.prediction_type, part.time_scale = "flow_prediction", 1000.0
    sch = DPMSolverPlusPlusScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver")

    def tv(weighted):
        g = torch.Generator().manual_seed(0)
        out = FKCSampler(models, target, scheduler=sch, weighted=weighted, **options).sample(
            torch.randn(2000, 2, generator=g, dtype=torch.float64), 200, generator=g, **call)
        return 0.5 * float((exact.component_shares(out.samples, out.weights) - exact.weights).abs().sum())

    assert tv(True) < 0.05 and tv(False) > 0.1
    with pytest.raises(ValueError, match="carry nothing at flow sigma 1"):
        FKCSampler(models, target, scheduler=DPMSolverPlusPlusScheduler(**zoo.FLOW_CONFIG), **options).sample(
            torch.randn(8, 2, dtype=torch.float64), 10, **call)



def test_fkc_table_cells_and_keys():
    """The FKC-CFG table: plain CFG at the same calls as each FKC cell, a key that separates every input, particle 0
    of each image starting where plain CFG starts, and SDE noise independent of every start noise."""
    from conftest import script
    from fastsample.sweep import noise_for

    m = script("fkc_cfg_sweep")
    cells = m.cells([3], [4, 8], 20, True, ["cfg", "fkc"], None)
    assert cells == [(3.0, "cfg", 1, 20, None), (3.0, "fkc", 4, 20, None), (3.0, "cfg", 1, 80, None),
                     (3.0, "fkc", 8, 20, None), (3.0, "cfg", 1, 160, None)]
    assert m.cells([3.0], [4], 20, False, ["fkc"], 1) == [(3.0, "fkc", 4, 20, 1.0)]
    base = dict(model="fmnist-cond", weights="aa", scale=3.0, method="fkc", particles=4, steps=20, per_class=50,
                seed=0, clip=None, batch_images=50)
    key = m.identity(**base)["key"]
    assert m.identity(**{**base, "scale": 3})["key"] == key
    for change in (dict(weights="bb"), dict(model="other"), dict(scale=5.0), dict(particles=8), dict(steps=40),
                   dict(per_class=100), dict(seed=1), dict(clip=1.0), dict(batch_images=25), dict(method="cfg")):
        assert m.identity(**{**base, **change})["key"] != key, change
    assert m.start_indices(range(2, 4), 3, 10) == [2, 12, 22, 3, 13, 23]
    assert m.start_indices(range(2, 4), 1, 10) == [2, 3]
    num, k, seed = 100, 16, 0
    starts = noise_for(range(k * num), (4,), seed)
    for b in (0, 50):
        first = torch.randn(4, generator=torch.Generator().manual_seed(m.sde_seed(seed, b)))
        assert not (starts == first).all(1).any(), b
    assert len({m.sde_seed(s, b) for s in (0, 1) for b in (0, 50, 100)}) == 6
