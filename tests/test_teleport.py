"""Analytic Gaussian teleportation: the closed form equals a fine numerical solve of the Gaussian-score ODE (VP, VE,
flow), low rank converges to full rank, statistics stream and round-trip, bad input is rejected."""
import math

import pytest
import torch
from scipy.integrate import solve_ivp

from fastsample.schedules import VE, ContinuousVP, RectifiedFlow
from fastsample.solvers.teleport import GaussianStats

F64 = torch.float64


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(12, 2, 3, 2, generator=g, dtype=F64)
    mixed = (torch.randn(3000, 12, generator=g, dtype=F64) * torch.linspace(1.5, 0.05, 12, dtype=F64)) @ basis.reshape(12, -1)
    return (mixed + 0.3).reshape(-1, 2, 3, 2)


def numerical(stats, x, schedule, t0, t1):
    """DOP853 of dx/dt = f x - g^2/2 score with f = a'/a, g^2/2 = s' s - f s^2 (x = a x0 + s eps)."""
    cov = stats.evecs @ torch.diag(stats.evals) @ stats.evecs.T

    def rhs(t, y):
        tt = torch.tensor(t, dtype=F64, requires_grad=True)
        a, s = schedule.alpha_sigma(tt)
        da, ds = (torch.autograd.grad(v, tt, retain_graph=True)[0] if v.requires_grad else 0.0 for v in (a, s))
        a, s, da, ds = float(a.detach()), float(s.detach()), float(da), float(ds)
        yt = torch.from_numpy(y).reshape(len(x), -1)
        prec = torch.linalg.inv(a * a * cov + s * s * torch.eye(cov.shape[0], dtype=F64))
        score = -(yt - a * stats.mean) @ prec
        return ((da / a) * yt - (ds * s - da / a * s * s) * score).numpy().ravel()

    sol = solve_ivp(rhs, (t0, t1), x.reshape(len(x), -1).numpy().ravel(), method="DOP853", rtol=1e-11, atol=1e-12)
    return torch.from_numpy(sol.y[:, -1]).reshape(x.shape)


@pytest.mark.parametrize("name, schedule, t0, t1", [
    ("vp", ContinuousVP("linear"), 1.0, 0.3), ("ve", VE(0.002, 80.0), 80.0, 2.0), ("flow", RectifiedFlow(), 0.98, 0.4)])
def test_closed_form_matches_a_fine_numerical_solve(data, name, schedule, t0, t1):
    stats = GaussianStats.from_samples(data)
    (a0, s0), (a1, s1) = [tuple(float(v) for v in schedule.alpha_sigma(torch.tensor(t, dtype=F64))) for t in (t0, t1)]
    x = torch.randn(4, 2, 3, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * math.sqrt(a0 ** 2 + s0 ** 2)
    closed = stats.teleport(x, a0, s0, a1, s1)
    assert float((closed - numerical(stats, x, schedule, t0, t1)).abs().max()) < 1e-5


def test_low_rank_converges_to_full_rank(data):
    full = GaussianStats.from_samples(data)
    x = torch.randn(8, 2, 3, 2, generator=torch.Generator().manual_seed(2), dtype=F64) * 20
    target = full.teleport(x, 0.05, 1.0, 0.8, 0.6)
    errors = [float((GaussianStats.from_samples(data, rank=r).teleport(x, 0.05, 1.0, 0.8, 0.6) - target).norm())
              for r in (1, 3, 6, 12)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-10 and errors[0] > 1e-3


def test_streaming_equals_in_memory_and_round_trips(data, tmp_path):
    a = GaussianStats.from_samples(data, rank=5)
    b = GaussianStats.from_dataset(((data[i:i + 700], None) for i in range(0, len(data), 700)), rank=5)
    assert torch.allclose(a.mean, b.mean, atol=1e-12) and torch.allclose(a.evals, b.evals, rtol=1e-9)
    assert torch.allclose((a.evecs.T @ b.evecs).abs(), torch.eye(5, dtype=F64), atol=1e-6)
    a.save(tmp_path / "s.safetensors")
    c = GaussianStats.load(tmp_path / "s.safetensors")
    assert c.shape == (2, 3, 2) and c.count == 3000 and torch.equal(c.evecs, a.evecs)


def test_bad_input(data, tmp_path):
    stats = GaussianStats.from_samples(data)
    with pytest.raises(ValueError, match=r"samples of shape \(2, 3, 2\), got \(12,\)"):
        stats.teleport(torch.zeros(2, 12), 0.1, 1.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        GaussianStats(stats.mean * float("nan"), stats.evecs, stats.evals, stats.shape)
    with pytest.raises(ValueError, match="rank must be in"):
        GaussianStats.from_samples(data, rank=13)
    with pytest.raises(ValueError, match="sigma_from must be > 0"):
        stats.teleport(torch.zeros(1, 2, 3, 2), 1.0, 0.0, 0.5, 0.5)


# ---------------------------------------------------------------------------- schedulers
from fastsample import sample  # noqa: E402
from fastsample.schedules import DiscreteVP, make_betas  # noqa: E402
from fastsample.solvers import DCSolverScheduler, DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler  # noqa: E402
from fastsample.testbeds import GaussianMixture  # noqa: E402

ALL = [DPMSolverPlusPlusScheduler, DEISScheduler, UniPCScheduler, DCSolverScheduler]


@pytest.fixture(scope="module")
def gauss_testbed(tmp_path_factory):
    """A 64-d Gaussian data set: the testbed model is its exact denoiser, the statistics are fitted on samples."""
    model = GaussianMixture.image_like(64, seed=3, mean_scale=0.3, schedule=DiscreteVP(make_betas()))
    g = torch.Generator().manual_seed(4)
    path = tmp_path_factory.mktemp("stats") / "gauss.safetensors"
    GaussianStats.from_samples(model.sample_data(20000, g)).save(path)
    return model, path


@pytest.mark.parametrize("cls", ALL)
def test_fraction_zero_is_the_base_scheduler_exactly(cls, gauss_testbed):
    model, path = gauss_testbed
    noise = torch.randn(6, 64, generator=torch.Generator().manual_seed(0), dtype=F64)
    base, _ = sample(model, noise, cls(), 8, progress=False)
    off = cls(teleport_stats=str(path), teleport_fraction=0.0)
    assert torch.equal(off.prepare_latents(noise, 8), noise)
    same, _ = sample(model, off.prepare_latents(noise, 8), off, 8, progress=False)
    assert torch.equal(same, base)


@pytest.mark.parametrize("cls", ALL)
def test_teleport_skips_steps_and_keeps_quality(cls, gauss_testbed, tmp_path):
    """30% of 10 steps in closed form: 7 model calls; on Gaussian data teleporting is exact, so the error against the
    teacher is no worse than the full 10-step solve, and better than 7 plain steps."""
    from fastsample.sampling import reference_states

    model, path = gauss_testbed
    noise = torch.randn(50, 64, generator=torch.Generator().manual_seed(1), dtype=F64)
    full = cls()
    full.set_timesteps(10)
    ref = reference_states(model, noise, full)[-1]
    err = lambda x: float((x - ref).norm() / ref.norm())  # noqa: E731
    tele = cls(teleport_stats=str(path), teleport_fraction=0.3)
    x, calls = sample(model, tele.prepare_latents(noise, 10), tele, 10, progress=False)
    assert calls == 7 and len(tele.timesteps) == 7
    x10, _ = sample(model, noise, cls(), 10, progress=False)
    x7, _ = sample(model, noise, cls(), 7, progress=False)
    assert err(x) <= 1.05 * err(x10) and err(x) < err(x7)
    by_sigma = cls(teleport_stats=str(path), teleport_sigma=float(tele.sigmas[0]))
    by_sigma.set_timesteps(10)
    assert torch.equal(by_sigma.timesteps, tele.timesteps)
    tele.save_pretrained(tmp_path / "s")
    again = cls.from_pretrained(tmp_path / "s")
    assert again.config.teleport_fraction == 0.3 and torch.equal(again.prepare_latents(noise, 10),
                                                                   tele.prepare_latents(noise, 10))


@pytest.mark.parametrize("kw, match", [
    (dict(teleport_fraction=1.0), r"teleport_fraction must be in \[0, 1\)"),
    (dict(teleport_fraction=-0.1), r"teleport_fraction must be in \[0, 1\)"),
    (dict(teleport_sigma=-1.0), "teleport_sigma must be a positive number"),
    (dict(teleport_fraction=0.2, teleport_stats=None), "need teleport_stats"),
])
def test_bad_teleport_config(kw, match, gauss_testbed):
    kw = {"teleport_stats": str(gauss_testbed[1]), **kw}
    with pytest.raises(ValueError, match=match):
        UniPCScheduler(**kw)


def test_statistics_for_another_shape_are_rejected(gauss_testbed):
    sch = UniPCScheduler(teleport_stats=str(gauss_testbed[1]), teleport_fraction=0.2)
    with pytest.raises(ValueError, match=r"samples of shape \(64,\), got \(1, 8, 8\)"):
        sch.prepare_latents(torch.zeros(2, 1, 8, 8), 10)


def test_choose_teleport_fraction(gauss_testbed):
    """On Gaussian data the model is the Gaussian: every node qualifies (errors ~ 0, fraction (N-1)/N); a model that
    is Gaussian only at high noise stops where it departs."""
    from fastsample.solvers.teleport import choose_teleport_fraction

    model, path = gauss_testbed
    stats = GaussianStats.load(path)
    probes = torch.randn(8, 64, generator=torch.Generator().manual_seed(5), dtype=F64)
    frac, errors = choose_teleport_fraction(model, UniPCScheduler(), stats, 10, probes, tol=0.05)
    assert frac == 0.9 and max(errors) < 0.05
    other = GaussianMixture.random(dim=64, components=4, seed=1, spread=3.0, schedule=DiscreteVP(make_betas()))
    frac2, errors2 = choose_teleport_fraction(other, UniPCScheduler(), stats, 10, probes, tol=0.05)
    assert frac2 < 0.9 and errors2[-1] > 0.05


@pytest.mark.parametrize("cls", ALL)
def test_teleport_on_a_flow_schedule(cls, gauss_testbed):
    """FlowMatch's schedule from sigma = 1: the closed form jumps from pure noise (alpha = 0) to the first kept level,
    and on Gaussian data that is exact: no worse than the full solve, better than as few plain steps."""
    from fastsample import zoo
    from fastsample.sampling import reference_states
    from fastsample.schedules import RectifiedFlow

    vp, path = gauss_testbed
    model = GaussianMixture(vp.means, vp.covs, vp.weights, schedule=RectifiedFlow(t_min=0.0),
                            prediction_type="flow_prediction", time_scale=1000.0)
    noise = torch.randn(50, 64, generator=torch.Generator().manual_seed(1), dtype=F64)
    full = cls(**zoo.FLOW_CONFIG)
    full.set_timesteps(10)
    ref = reference_states(model, noise, full)[-1]
    err = lambda x: float((x - ref).norm() / ref.norm())  # noqa: E731
    tele = cls(**zoo.FLOW_CONFIG, teleport_stats=str(path), teleport_fraction=0.3)
    x, calls = sample(model, tele.prepare_latents(noise, 10), tele, 10, progress=False)
    assert calls == 7 and tele.teleport_origin == (0.0, 1.0)
    x10, _ = sample(model, noise, cls(**zoo.FLOW_CONFIG), 10, progress=False)
    x7, _ = sample(model, noise, cls(**zoo.FLOW_CONFIG), 7, progress=False)
    assert err(x) <= 1.05 * err(x10) and err(x) < err(x7), (err(x), err(x10), err(x7))


@pytest.mark.parametrize("cls", ALL)
def test_a_saved_folder_with_teleport_and_a_learned_schedule_can_be_moved(cls, gauss_testbed, tmp_path):
    """Issue 20 F10: save_pretrained copies the statistics into the folder and names them relative to it; the
    folder, moved elsewhere (the original statistics deleted), loads and samples identically."""
    import shutil

    model, path = gauss_testbed
    stats = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(path, stats)
    s = cls(teleport_stats=str(stats), teleport_fraction=0.3, learned_timesteps=[999.0, 700.5, 400.25, 120.0],
            final_sigmas_type="zero")
    noise = torch.randn(4, 64, generator=torch.Generator().manual_seed(2), dtype=F64)
    a, _ = sample(model, s.prepare_latents(noise, 4), s, 4, progress=False)
    s.save_pretrained(tmp_path / "saved")
    assert s.config.teleport_stats == str(stats)  # the live scheduler keeps its own path
    shutil.move(str(tmp_path / "saved"), str(tmp_path / "moved"))
    stats.unlink()
    t = cls.from_pretrained(tmp_path / "moved")
    b, _ = sample(model, t.prepare_latents(noise, 4), t, 4, progress=False)
    assert torch.equal(a, b)


def test_shipped_statistics_are_named_not_copied(tmp_path):
    """A scheduler on the package's own Fashion-MNIST statistics saves them as "zoo:<file>" (no machine path, no
    copy), and loads back the same statistics anywhere; the shipped teleport folders are saved so."""
    import json
    from pathlib import Path

    from fastsample import zoo

    stats = zoo.MODELS_DIR / "fmnist-gaussian.safetensors"
    s = UniPCScheduler(**zoo.SCHEDULER_CONFIG, teleport_stats=str(stats), teleport_fraction=0.2)
    s.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert cfg["teleport_stats"] == "zoo:fmnist-gaussian.safetensors" and not (tmp_path / "teleport_stats.safetensors").exists()
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(UniPCScheduler.from_pretrained(tmp_path).prepare_latents(noise, 10), s.prepare_latents(noise, 10))
    root = Path(__file__).resolve().parent.parent
    for f in (root / "learned").glob("*/*/scheduler_config.json"):
        value = json.loads(f.read_text()).get("teleport_stats")
        assert value is None or not Path(value).is_absolute(), f


def test_statistics_files_are_validated_when_loaded(tmp_path):
    """Issue 20 F11: negative eigenvalues gave NaN latents silently; a missing tensor or bad metadata gave a raw
    KeyError or JSONDecodeError without the file's name."""
    from safetensors.torch import save_file

    from fastsample.solvers.teleport import GaussianStats

    g = torch.Generator().manual_seed(0)
    good = GaussianStats.from_samples(torch.randn(50, 2, 3, generator=g, dtype=F64), rank=4)
    tensors = {"mean": good.mean, "evecs": good.evecs, "evals": good.evals}
    meta = {"shape": "[2, 3]", "count": "50"}
    cases = [
        ({**tensors, "evals": -good.evals}, meta, r"evals \(variances\) must be >= 0"),
        ({**tensors, "evecs": 2 * good.evecs}, meta, "orthonormal columns"),
        ({k: v for k, v in tensors.items() if k != "evecs"}, meta, r"missing \['evecs'\]"),
        (tensors, {"count": "50"}, r"missing \['shape'\]"),
        (tensors, {"shape": "[2, 3", "count": "50"}, "bad metadata"),
        (tensors, {"shape": "[2, 4]", "count": "50"}, "inconsistent statistics"),
        (tensors, {"shape": "[0, 3]", "count": "50"}, "sample shape must be positive integers"),
        ({**tensors, "mean": torch.full_like(good.mean, float("nan"))}, meta, "mean contains NaN"),
    ]
    for i, (t, m, match) in enumerate(cases):
        path = tmp_path / f"bad{i}.safetensors"
        save_file({k: v.contiguous() for k, v in t.items()}, str(path), metadata=m)
        with pytest.raises(ValueError, match=f"bad{i}.safetensors"):
            GaussianStats.load(path)
        with pytest.raises(ValueError, match=match):
            GaussianStats.load(path)
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    with pytest.raises(ValueError, match="text.safetensors is not a safetensors file"):
        GaussianStats.load(tmp_path / "text.safetensors")
    path = tmp_path / "good.safetensors"
    good.save(path)
    again = GaussianStats.load(path)
    assert torch.equal(again.evals, good.evals) and again.shape == (2, 3)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        GaussianStats.from_moments(10, torch.zeros(2, dtype=F64), -torch.eye(2, dtype=F64), (2,))
