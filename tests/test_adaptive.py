"""Adaptive step size (fastsample.adaptive): the multistep embedded pair reaches an end-point error of 1e-3 on the
exact testbeds with at most 0.8x the NFE of k-diffusion's sample_dpm_adaptive, compared in one run; it is usable
from fastsample.sample and validates its options."""
import importlib.util
from pathlib import Path

import pytest
import torch

from fastsample import sample
from fastsample.k_diffusion import import_k_diffusion_sampling
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.solvers import DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsample.testbeds import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def bench():
    spec = importlib.util.spec_from_file_location("bench_adaptive", ROOT / "experiments" / "bench_adaptive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fewer_calls_than_k_diffusion_at_an_error_of_1e_3():
    if import_k_diffusion_sampling() is None:
        pytest.skip("k-diffusion is not installed (make install adds it)")
    b = bench()
    _, ratios = b.summary(b.run(num=16, seed=0))
    for bed in ("mixture-16d", "image-like-64d"):
        assert ratios[(bed, "fastsample unipc3")] is not None and ratios[(bed, "fastsample unipc3")] <= 0.8, ratios


def test_adaptive_sample_converges_and_counts_its_calls():
    gm = GaussianMixture.random(dim=16, components=3, seed=2, spread=1.5, schedule=DiscreteVP(make_betas()))
    z = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, _ = sample(gm, z, UniPCScheduler(solver_order=3, final_sigmas_type="zero"), 400, progress=False)
    errors, calls = [], []
    for rtol in (0.05, 0.005):
        seen = []
        x, nfe = sample(gm, z, UniPCScheduler(solver_order=3, final_sigmas_type="zero"), progress=False,
                        adaptive=dict(rtol=rtol, atol=rtol / 6.4), callback=lambda i, t, x: seen.append(i))
        assert nfe == len(seen)
        errors.append(float((x - ref).norm() / ref.norm()))
        calls.append(nfe)
    assert errors[1] < 0.2 * errors[0] and calls[1] > calls[0], (errors, calls)
    x, _ = sample(gm, z, DPMSolverPlusPlusScheduler(solver_order=3, final_sigmas_type="zero"), progress=False,
                  adaptive=dict(rtol=0.005, atol=0.0008))
    assert float((x - ref).norm() / ref.norm()) < 5e-3


@pytest.mark.parametrize("adaptive, match", [
    (dict(rtol=0), "adaptive rtol must be a finite number > 0"),
    (dict(atol=-1), "adaptive atol must be a finite number >= 0"),
    (dict(h_init=float("nan")), "adaptive h_init"),
    (dict(max_steps=0), "adaptive max_steps must be a positive integer"),
    (dict(tol=1), r"adaptive takes rtol, atol, h_init and max_steps, got \['tol'\]"),
    ([0.1], "adaptive must be a dict"),
])
def test_bad_adaptive_options(adaptive, match):
    gm = GaussianMixture.random(dim=4, seed=0, schedule=DiscreteVP(make_betas()))
    with pytest.raises(ValueError, match=match):
        sample(gm, torch.randn(2, 4), UniPCScheduler(), adaptive=adaptive, progress=False)


def test_adaptive_refuses_what_it_cannot_do():
    gm = GaussianMixture.random(dim=4, seed=0, schedule=DiscreteVP(make_betas()))
    with pytest.raises(ValueError, match="deterministic solver"):
        sample(gm, torch.randn(2, 4), DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++"),
               adaptive={}, progress=False)
    with pytest.raises(ValueError, match="adaptive chooses the steps itself"):
        sample(gm, torch.randn(2, 4), UniPCScheduler(), adaptive={}, sigmas=[10.0, 1.0], progress=False)
    with pytest.raises(RuntimeError, match="did not reach sigma"):
        sample(gm, torch.randn(2, 4), UniPCScheduler(), adaptive=dict(max_steps=3), progress=False)
    flow = UniPCScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="flow models"):
        sample(gm, torch.randn(2, 4), flow, adaptive={}, progress=False)
