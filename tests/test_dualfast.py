"""DualFast: off is the base solver exactly; one step is the closed form; every deterministic solver takes it and
save_pretrained carries it; it stacks with DC, teleportation and learned schedules; at NFE 5 it cuts the error on the
exact testbed; bad values are named."""
import math

import pytest
import torch

from fastsample import sample
from fastsample.registry import make_scheduler, variants
from fastsample.sampling import reference_states
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.solvers import DCSolverScheduler
from fastsample.testbeds import GaussianMixture
from fastsample.transforms import DualFast
from fastsample.zoo import SCHEDULER_CONFIG

F64 = torch.float64
DETERMINISTIC = [name for name, (info, v) in variants().items() if v.order is not None]


@pytest.fixture(scope="module")
def gaussian():
    return GaussianMixture.image_like(64, seed=0, mean_scale=0.5, schedule=DiscreteVP(make_betas()))


def noise(n=64, seed=5):
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_deterministic_solver_takes_it_and_zero_is_off(gaussian, name):
    x = noise(8)
    base = sample(gaussian, x, make_scheduler(name, **SCHEDULER_CONFIG), 6, progress=False)[0]
    off = sample(gaussian, x, make_scheduler(name, **SCHEDULER_CONFIG, dualfast=0.0), 6, progress=False)[0]
    on = sample(gaussian, x, make_scheduler(name, **SCHEDULER_CONFIG, dualfast=0.5), 6, progress=False)[0]
    assert torch.equal(base, off)
    assert torch.isfinite(on).all() and not torch.allclose(on, base)


@pytest.mark.parametrize("reference", ["previous", "first"])
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_ddim_step_is_the_closed_form(gaussian, reference, schedule):
    """With DDIM (first order, data form): x_{i+1} = (s'/s) x + (a' - a s'/s) x0~, x0~ = (x - s eps~) / a,
    eps~_i = (1 + c_i) eps_i - c_i eps_tau."""
    c, n = 0.4, 5
    sch = make_scheduler("ddim", **SCHEDULER_CONFIG, dualfast=dict(c=c, reference=reference, schedule=schedule))
    x = noise(4)
    ours = sample(gaussian, x, sch, n, progress=False)[0]
    g, ts = sch.grid, sch.timesteps
    eps_ref, y = None, x.clone()
    for i in range(n):
        eps = gaussian(y, ts[i])
        ci = c if schedule == "constant" else c * (1 - i / n)
        mixed = eps if eps_ref is None else (1 + ci) * eps - ci * eps_ref
        if eps_ref is None or reference == "previous":
            eps_ref = eps
        x0 = (y - g.sigma[i] * mixed) / g.alpha[i]
        r = g.sigma[i + 1] / g.sigma[i]
        y = r * y + (g.alpha[i + 1] - g.alpha[i] * r) * x0
    assert torch.allclose(ours, y, rtol=0, atol=1e-12)


def _error(model, x, name, nfe, **config):
    s = make_scheduler(name, **SCHEDULER_CONFIG)
    s.set_timesteps(nfe)
    ref = reference_states(model, x, s)[-1]
    out = sample(model, x, make_scheduler(name, **SCHEDULER_CONFIG, **config), nfe, progress=False)[0]
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", ["unipc3", "dpm++2m", "dpm++3m", "deis"])
def test_cuts_the_error_at_nfe5_on_the_exact_testbed(gaussian, name):
    """At most 0.85x the error without it (c = 0.5, the previous prediction), against the converged solve from the
    same noise; scripts/dualfast_bench.py measures the whole table."""
    x = noise()
    ratio = _error(gaussian, x, name, 5, dualfast=0.5) / _error(gaussian, x, name, 5)
    assert ratio < 0.85, ratio


def test_save_pretrained_carries_it(tmp_path, gaussian):
    s = make_scheduler("unipc3", **SCHEDULER_CONFIG, dualfast={"c": 0.3, "schedule": "linear"})
    s.save_pretrained(tmp_path)
    t = type(s).from_pretrained(tmp_path)
    assert t.config.dualfast == {"c": 0.3, "schedule": "linear"}
    x = noise(4)
    assert torch.equal(sample(gaussian, x, s, 6, progress=False)[0], sample(gaussian, x, t, 6, progress=False)[0])
    (df,) = t.prediction_transforms(6)
    assert isinstance(df, DualFast) and df.reference == "previous" and df.coefficient(3, 6) == pytest.approx(0.15)


def test_stacks_with_dc_teleport_and_learned_schedules(gaussian, tmp_path):
    x = noise(8)
    dc = DCSolverScheduler(**SCHEDULER_CONFIG, dc_ratios=[1.0, 1.0, 0.9, 1.1, 1.2, 1.0], dualfast=0.4)
    kinds = [type(t).__name__ for t in dc.prediction_transforms(6)]
    assert kinds == ["DualFast", "DynamicCompensation"]
    both = sample(gaussian, x, dc, 6, progress=False)[0]
    only_dc = sample(gaussian, x, DCSolverScheduler(**SCHEDULER_CONFIG, dc_ratios=dc.config.dc_ratios), 6,
                     progress=False)[0]
    assert torch.isfinite(both).all() and not torch.allclose(both, only_dc)
    from fastsample.solvers.teleport import GaussianStats

    stats = GaussianStats.from_samples(gaussian.sample_data(4000, torch.Generator().manual_seed(9)))
    stats.save(tmp_path / "s.safetensors")
    tele = make_scheduler("unipc3", **SCHEDULER_CONFIG, teleport_stats=str(tmp_path / "s.safetensors"),
                          teleport_fraction=0.3, dualfast=0.4)
    assert [type(t).__name__ for t in tele.prediction_transforms(4)] == ["DualFast"]
    out = sample(gaussian, x, tele, 6, progress=False)[0]
    plain = sample(gaussian, x, make_scheduler("unipc3", **SCHEDULER_CONFIG, teleport_stats=str(tmp_path / "s.safetensors"),
                                              teleport_fraction=0.3), 6, progress=False)[0]
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)
    learned = make_scheduler("unipc3", **SCHEDULER_CONFIG, learned_timesteps=[999, 700, 400, 150, 20],
                             learned_scales=[1.0, 1.0, 0.99, 1.0, 1.0], dualfast=0.4)
    learned.set_timesteps(5)
    assert learned.timesteps.tolist() == [999, 700, 400, 150, 20]
    out = sample(gaussian, x, learned, 5, progress=False)[0]
    assert torch.isfinite(out).all()


def test_flow_models(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastsample.schedules import RectifiedFlow

    gm = GaussianMixture.random(dim=4, components=3, seed=1, schedule=RectifiedFlow(t_min=0.0),
                                prediction_type="flow_prediction", time_scale=1000.0)
    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    from fastsample.solvers import UniPCScheduler

    ref = sample(gm, x, UniPCScheduler.from_config(cfg, solver_order=3), 400, progress=False)[0]
    err = {c: float((sample(gm, x, UniPCScheduler.from_config(cfg, solver_order=3, dualfast=c), 5,
                            progress=False)[0] - ref).norm() / ref.norm()) for c in (0.0, 0.5)}
    assert all(math.isfinite(e) for e in err.values()) and err[0.5] != err[0.0]


@pytest.mark.parametrize("value, match", [
    (-0.1, r"dualfast must be a mixing coefficient c in \[0, 2.0\]"),
    (3.0, "dualfast must be"), (math.nan, "dualfast must be"), ("0.5", "dualfast must be"), (True, "dualfast must be"),
    ({"c": 0.5, "reference": "last"}, "dualfast_reference must be one of"),
    ({"c": 0.5, "schedule": "cosine"}, "dualfast_schedule must be one of"),
    ({"c": 0.5, "tau": 3}, "dualfast as a dict takes 'c'"), ({"reference": "first"}, "dualfast as a dict takes 'c'"),
])
def test_bad_values_are_named(value, match):
    with pytest.raises(ValueError, match=match):
        make_scheduler("unipc3", dualfast=value)

