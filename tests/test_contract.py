"""The adapter contract: state, reuse, dtypes, save/load, custom schedules and clear errors on bad input."""
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from conftest import rel_err, run_loop, smooth_model
from fastsample.solvers import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler

from fastsample.registry import solvers  # noqa: E402

CLASSES = [info.scheduler for info in solvers()]  # every registered scheduler
def top(cls, **config):
    """A scheduler at its highest solver_order among its deterministic variants (3, or Heun's 2), with those of
    ``config``'s keys that it has (BDIA, a DDIM, has neither solver_order nor final_sigmas_type)."""
    from fastsample.registry import config_keys

    info, keys = next(i for i in solvers() if i.scheduler is cls), config_keys(cls)
    config = {k: v for k, v in config.items() if k in keys}
    if "solver_order" in keys:
        config = {"solver_order": max((v.options.get("solver_order", 2) for v in info.variants if v.order), default=2),
                  **config}
    return cls(**config)


@pytest.mark.parametrize("cls", CLASSES)
def test_reuse_gives_identical_results(cls, latents):
    s = top(cls)  # a seeded generator: the stochastic schedulers (ER-SDE) repeat too
    a = run_loop(s, latents.clone(), 9, generator_seed=0)
    b = run_loop(s, latents.clone(), 9, generator_seed=0)
    assert torch.equal(a, b)
    run_loop(s, latents.clone(), 4, generator_seed=1)  # a different run in between
    assert torch.equal(run_loop(s, latents.clone(), 9, generator_seed=0), a)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_in_dtype_out(cls, dtype, latents):
    out = run_loop(top(cls), latents.to(dtype), 8, generator_seed=0)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    ref = run_loop(top(cls), latents.double(), 8, generator_seed=0)
    assert rel_err(out, ref) < {torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)


def test_unipc_order3_float64_where_diffusers_needs_float32(latents):
    out = run_loop(UniPCScheduler(solver_order=3), latents.double(), 10)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_unipc_bh1_final_step_to_zero_is_finite(latents):
    ref = run_loop(UniPCMultistepScheduler(solver_type="bh1"), latents.clone(), 10, pass_generator=False)
    ours = run_loop(UniPCScheduler(solver_type="bh1"), latents.clone(), 10)
    assert not torch.isfinite(ref).all()  # diffusers 0.42: NaN at the last step
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("cls", CLASSES)
def test_save_load_round_trip(cls, tmp_path, latents):
    s = top(cls, prediction_type="v_prediction", spacing="karras", final_sigmas_type="zero")
    s.save_pretrained(tmp_path)
    t = cls.from_pretrained(tmp_path)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(t.config) == strip(s.config)
    assert torch.equal(run_loop(s, latents.clone(), 7, generator_seed=0), run_loop(t, latents.clone(), 7, generator_seed=0))


def test_config_carries_our_options(tmp_path, latents):
    s = DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++", eta=0.5, noise_type="brownian_tree",
                                   spacing="ays_sd15", third_order="exact", solver_order=3)
    s.save_pretrained(tmp_path)
    t = DPMSolverPlusPlusScheduler.from_pretrained(tmp_path)
    assert (t.config.eta, t.config.noise_type, t.config.spacing, t.config.third_order) == (0.5, "brownian_tree", "ays_sd15", "exact")
    assert torch.equal(run_loop(s, latents.clone(), 6, generator_seed=0), run_loop(t, latents.clone(), 6, generator_seed=0))


def test_peer_values_are_mapped():
    assert DPMSolverPlusPlusScheduler(algorithm_type="deis", solver_type="logrho").config.solver_type == "midpoint"
    deis = DEISScheduler(algorithm_type="dpmsolver++", solver_type="midpoint")
    # the tAB form lives in deis_type, so that diffusers' schedulers (which know only their own solver_type values)
    # can still be made from this config
    assert (deis.config.solver_type, deis.config.deis_type, deis.solver.solver_type) == ("logrho", "tab", "tab")
    assert DEISScheduler(solver_type="logrho").solver.solver_type == "logrho"
    assert UniPCScheduler(solver_type="heun").config.solver_type == "bh2"
    ours = DPMSolverPlusPlusScheduler.from_config(DPMSolverMultistepScheduler(solver_order=3).config)
    assert ours.config.solver_order == 3


def test_model_outputs_is_settable_and_reset(latents):
    s = UniPCScheduler(solver_order=2)
    s.set_timesteps(5)
    assert s.model_outputs == [None, None]
    s.model_outputs = [latents, latents * 2]
    assert torch.equal(s.model_outputs[-1], latents * 2)
    s.set_timesteps(5)
    assert s.model_outputs == [None, None]


def test_custom_sigmas_and_timesteps(latents):
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(sigmas=[14.6, 5.0, 1.5, 0.3])
    assert s.num_inference_steps == 4 and len(s.timesteps) == 4 and s.sigmas[-1] == 0
    assert torch.allclose(s.sigmas[:4], torch.tensor([14.6, 5.0, 1.5, 0.3]))
    s.set_timesteps(sigmas=[14.6, 5.0, 1.5, 0.3, 0.0])  # a trailing 0 marks the end: same grid
    assert s.num_inference_steps == 4
    s.set_timesteps(timesteps=[999, 700, 400, 100])
    assert s.timesteps.tolist() == [999, 700, 400, 100] and s.timesteps.dtype == torch.int64
    out = run_loop(DEISScheduler(), latents.clone(), timesteps=[999, 700, 400, 100])
    assert torch.isfinite(out).all()


def test_deis_karras_wastes_no_model_call(latents):
    s = DEISScheduler(use_karras_sigmas=True)  # final sigma_min, as diffusers' DEIS
    s.set_timesteps(6)
    assert len(set(s.sigmas.tolist())) == 7  # no duplicated last level: all 6 model calls move the sample


def test_brownian_tree_noise_is_consistent_across_step_counts():
    """With a Brownian tree, a seed's SDE samples at 100 and 400 steps agree far better than with fresh noise."""
    from fastsample.schedules import DiscreteVP, make_betas
    from fastsample.testbeds import GaussianMixture

    gm = GaussianMixture.random(dim=6, components=2, seed=3, schedule=DiscreteVP(make_betas()))
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = {}
    for noise_type in ("brownian_tree", "gaussian"):
        outs = [run_loop(DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++", noise_type=noise_type,
                                                    use_lu_lambdas=True), x.clone(), n, model=gm, generator_seed=5)
                for n in (100, 400)]
        res[noise_type] = rel_err(outs[0], outs[1])
    assert res["brownian_tree"] < 0.1 * res["gaussian"], res


def test_sde_is_reproducible_per_seed(latents):
    s = DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++")
    assert torch.equal(run_loop(s, latents.clone(), 6, generator_seed=1), run_loop(s, latents.clone(), 6, generator_seed=1))
    assert not torch.equal(run_loop(s, latents.clone(), 6, generator_seed=1), run_loop(s, latents.clone(), 6, generator_seed=2))


def test_flow_model_sigmas_and_shift(latents):
    s = UniPCScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    s.set_timesteps(6)
    assert s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0 and s.timesteps[0] == 1000.0
    assert torch.isfinite(run_loop(s, latents.clone(), 6)).all()
    d = DPMSolverPlusPlusScheduler(use_flow_sigmas=True, use_dynamic_shifting=True, prediction_type="flow_prediction")
    d.set_timesteps(5, mu=0.8)
    assert torch.isfinite(run_loop(d, latents.clone(), mu=0.8, num_inference_steps=5)).all()
    e = DEISScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")  # noise form: starts below 1
    e.set_timesteps(5)
    assert e.sigmas[0] == pytest.approx(0.999) and torch.isfinite(run_loop(e, latents.clone(), 5)).all()


def test_img2img_begin_index(latents):
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(10)
    s.set_begin_index(4)
    x = s.add_noise(latents, torch.randn_like(latents), s.timesteps[4:5])
    for t in s.timesteps[4:]:
        x = s.step(smooth_model(x, t), t, x).prev_sample
    assert s.step_index == 10 and torch.isfinite(x).all()


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kw,match", [
    (dict(solver_order=7), "solver_order must be"),
    (dict(solver_order=0), "solver_order must be"),
    (dict(prediction_type="score"), "prediction_type must be one of"),
    (dict(final_sigmas_type="one"), "final_sigmas_type must be one of"),
    (dict(timestep_spacing="cosine"), "timestep_spacing must be one of"),
    (dict(spacing="uniformish"), "spacing must be one of"),
    (dict(beta_schedule="sigmoid"), "beta_schedule must be one of"),
    (dict(use_karras_sigmas=True, use_exponential_sigmas=True), "only one of"),
])
def test_bad_config_is_rejected(cls, kw, match):
    from fastsample.registry import config_keys

    if not set(kw) <= config_keys(cls):  # a key the scheduler does not have (BDIA, a DDIM: no solver_order) is loud
        match = "unexpected keyword argument"
    with pytest.raises((ValueError, TypeError), match=match):
        cls(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(algorithm_type="dpm"), "algorithm_type must be one of"),
    (dict(solver_type="rk4"), "solver_type must be one of"),
    (dict(algorithm_type="sde-dpmsolver++", eta=1.5), "eta must be a number in"),
    (dict(eta=0.5), "needs algorithm_type 'sde-dpmsolver"),
    (dict(third_order="best"), "third_order must be one of"),
    (dict(noise_type="pink"), "noise_type must be one of"),
])
def test_bad_dpm_options(kw, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverPlusPlusScheduler(**kw)


def test_bad_solver_types():
    with pytest.raises(ValueError, match="solver_type must be one of"):
        UniPCScheduler(solver_type="bh3")
    with pytest.raises(ValueError, match="solver_type must be one of"):
        DEISScheduler(solver_type="rhoab")


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_set_timesteps(cls):
    s = cls()
    for n in (0, -3, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps must be"):
            s.set_timesteps(n)
    with pytest.raises(ValueError, match="timesteps must be strictly decreasing"):
        s.set_timesteps(timesteps=[500, 700, 100])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        s.set_timesteps(timesteps=[1500, 700, 100])
    with pytest.raises(ValueError, match="sigmas must be strictly decreasing"):
        s.set_timesteps(sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="exactly one of"):
        s.set_timesteps(5, timesteps=[999, 500])
    with pytest.raises(ValueError, match="exactly one of"):
        s.set_timesteps()


@pytest.mark.parametrize("cls", CLASSES)
def test_step_before_set_timesteps(cls, latents):
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        cls().step(latents, 999, latents)


@pytest.mark.parametrize("cls", CLASSES)
def test_nan_model_output_names_the_step(cls, latents):
    s = cls()
    s.set_timesteps(5)
    x = latents.clone()
    for i, t in enumerate(s.timesteps):
        out = smooth_model(x, t)
        if i == 2:
            out[0, 0, 0, 0] = float("nan")
            with pytest.raises(ValueError, match="NaN or Inf at step 2"):
                s.step(out, t, x)
            break
        x = s.step(out, t, x).prev_sample


def test_too_many_steps_is_an_error(latents):
    s = DPMSolverPlusPlusScheduler()
    x = run_loop(s, latents.clone(), 3)
    with pytest.raises(RuntimeError, match="call set_timesteps again"):
        s.step(smooth_model(x, 0), 0, x)


@pytest.mark.parametrize("cls", CLASSES)
def test_step_counts_and_train_timesteps_are_checked(cls):
    """Issue 20 F1, F8, F13: 1000 linspace steps round two steps onto timestep 500 (an error that says so, not a
    ZeroDivisionError); a fractional, huge or string num_train_timesteps is a config error."""
    from fastsample.registry import config_keys

    if {"solver_order", "predictor_order"} & config_keys(cls):  # the multistep solvers' n + 1-point linspace
        with pytest.raises(ValueError, match=r"num_inference_steps=1000 with timestep_spacing='linspace'.*\[500\.0\]"):
            cls(timestep_spacing="linspace").set_timesteps(1000)
    else:  # DDIM's linspace (BDIA) spans 0..999 with n points: 1000 steps are every timestep once
        s = cls(timestep_spacing="linspace")
        s.set_timesteps(1000)
        assert s.timesteps.tolist() == list(range(999, -1, -1))
    s = top(cls, timestep_spacing="trailing", final_sigmas_type="zero")
    s.set_timesteps(1000)  # every training step once: fine (DEIS's default end, sigma_min, is then step 0 itself)
    assert s.num_inference_steps == 1000
    for bad in (1000.7, 5_000_000, "1000", 1):
        with pytest.raises(ValueError, match=r"num_train_timesteps must be an integer in \[2, 100000\]"):
            cls(num_train_timesteps=bad)


@pytest.mark.parametrize("cls", CLASSES)
def test_sigmas_outside_the_trained_range_are_an_error(cls):
    """Issue 20 F2: sigmas above (or below) the discrete schedule's range were clamped silently (scheduler.sigmas said
    1e6 while the solve started at 157); now an error that names the range.  Published lists rounded within 1e-4 of
    the end (AYS's 14.615 for SD's 14.6146) still work."""
    linear = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")  # (Heun's defaults are SD's betas)
    with pytest.raises(ValueError, match=r"sigmas must lie in the model's trained range \[0\.01.*, 157\.4"):
        cls(**linear).set_timesteps(sigmas=[1e6, 10.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="trained range"):
        cls(**linear).set_timesteps(sigmas=[10.0, 1.0, 1e-4, 0.0])
    sd = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sd.set_timesteps(sigmas=[14.615, 6.475, 3.861, 0.152, 0.0])
    assert sd.num_inference_steps == 4


@pytest.mark.parametrize("cls", CLASSES)
def test_decoupled_model_times_outside_the_trained_range_are_an_error(cls):
    """Issue 20 F3: set_timesteps(sigmas=..., timesteps=...) sent -300 and 1e9 to the model."""
    for bad in ([-300.0, 500.0, 10.0], [1e9, 500.0, 10.0], [999.5, 500.0, 10.0]):
        with pytest.raises(ValueError, match=r"must lie in \[0, 999\], the model's trained times"):
            cls().set_timesteps(sigmas=[10.0, 1.0, 0.1, 0.0], timesteps=bad)
    s = cls()
    s.set_timesteps(sigmas=[10.0, 1.0, 0.1, 0.0], timesteps=[800.5, 500.0, 10.0])
    assert list(dict.fromkeys(s.timesteps.tolist())) == [800.5, 500.0, 10.0]
    from fastsample.registry import config_keys

    if "use_flow_sigmas" not in config_keys(cls):  # BDIA, a DDIM, takes VP configs only
        return
    flow = cls(use_flow_sigmas=True, prediction_type="flow_prediction")
    flow.set_timesteps(sigmas=[1.0, 0.5, 0.1, 0.0], timesteps=[1000.0, 500.0, 100.0])  # flow time reaches 1000
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        flow.set_timesteps(sigmas=[1.0, 0.5, 0.1, 0.0], timesteps=[1001.0, 500.0, 100.0])


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kw, match", [
    (dict(trained_betas=[0.01] * 10), r"trained_betas must be num_train_timesteps \(1000\) numbers in \(0, 1\), got 10"),
    (dict(trained_betas=[1.5] * 1000), r"trained_betas must be .* in \(0, 1\)"),
    (dict(timestep_spacing="leading", steps_offset=5000), r"steps_offset=5000 .* at most \d+"),
    (dict(timestep_spacing="leading", steps_offset=-1), "steps_offset must be a non-negative integer, got -1"),
    (dict(use_karras_sigmas=True, sigma_max=float("inf")), "sigma_min and sigma_max must be finite"),
    (dict(thresholding=True, sample_max_value=-1.0), "sample_max_value must be a positive finite number, got -1"),
    (dict(thresholding=True, dynamic_thresholding_ratio=2.0), r"dynamic_thresholding_ratio must be a quantile in \(0, 1\]"),
])
def test_bad_schedule_configs_are_config_errors(cls, kw, match):
    """Issue 20 F5, F6: ZeroDivisionError, LinAlgError, a first-step torch error or x0 forced to +1 before; now a
    ValueError naming the key, at construction or at set_timesteps."""
    from fastsample.registry import config_keys

    if "sigma_max" in kw and "sigma_max" not in config_keys(cls):
        pytest.skip(f"{cls.__name__} has no sigma_max")
    with pytest.raises(ValueError, match=match.replace("number, got", "number .*got")):
        cls(**kw).set_timesteps(5)


def test_lambda_min_clipped_that_cuts_everything_is_an_error():
    with pytest.raises(ValueError, match=r"lambda_min_clipped=1000000000.0 cuts off every timestep.*must be below 4\.2"):
        DPMSolverPlusPlusScheduler(lambda_min_clipped=1e9).set_timesteps(5)
    with pytest.raises(ValueError, match="lambda_min_clipped must be a number"):
        DPMSolverPlusPlusScheduler(lambda_min_clipped=float("nan")).set_timesteps(5)
    # diffusers' use for squaredcos_cap_v2: the noisiest steps cut, the same timesteps as diffusers
    kw = dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)
    ours, ref = DPMSolverPlusPlusScheduler(**kw), DPMSolverMultistepScheduler(**kw)
    ours.set_timesteps(10), ref.set_timesteps(10)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("cls", CLASSES)
def test_unknown_timestep_nan_sample_and_nan_noise_are_errors(cls, latents):
    """Issue 20 F9: an unknown first timestep jumped silently to the last step; a NaN sample or variance_noise was
    not checked."""
    s = cls()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match=r"timestep 123 is not one of this scheduler's timesteps.*set_begin_index"):
        s.step(smooth_model(latents, 123), 123, latents)
    bad = latents.clone()
    bad[0, 0, 0, 0] = float("nan")
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="sample contains NaN or Inf at step 0"):
        s.step(smooth_model(latents, t), t, bad)
    s = cls(algorithm_type="sde-dpmsolver++") if cls is DPMSolverPlusPlusScheduler else cls()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="variance_noise contains NaN or Inf at step 0"):
        s.step(smooth_model(latents, t), t, latents, variance_noise=bad)


def test_deferred_nonfinite_check_is_readable_before_the_last_step(latents):
    """Issue 20 F9: on an accelerator the NaN check does not wait for the device at each step; a loop that stops
    early reads ``nonfinite_step``, and the last step raises."""
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(4)
    assert s.nonfinite_step is None
    good, bad = latents.clone(), latents.clone()
    bad[0, 0, 0, 0] = float("inf")
    s._check_finite(0, 999, defer=True, model_output=good, sample=good)
    assert s.nonfinite_step is None
    s._check_finite(1, 700, defer=True, model_output=bad, sample=good)
    s._check_finite(2, 400, defer=True, model_output=good, sample=good)
    assert s.nonfinite_step == 1
    with pytest.raises(ValueError, match="NaN or Inf at step 1"):
        s._check_finite(3, 100, defer=True, model_output=good, sample=good)
    s.set_timesteps(4)
    assert s.nonfinite_step is None


def test_a_float32_sum_that_overflows_on_finite_values_is_not_an_error():
    """The CPU check sums the step's result in its dtype and looks closer only when that sum is not finite: finite
    values whose float32 sum overflows (384 values of 1e37) pass; a NaN in the model output is still named."""
    import math

    s = DPMSolverPlusPlusScheduler(prediction_type="sample")
    s.set_timesteps(5)
    big = torch.full((2, 3, 8, 8), 1e37)
    assert not math.isfinite(float(big.sum())) and math.isfinite(float(big.sum(dtype=torch.float64)))
    t = s.timesteps[0]
    out = s.step(big.clone(), t, big.clone()).prev_sample
    assert torch.isfinite(out).all()
    bad = big.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="model_output contains NaN or Inf at step 1"):
        s.step(bad, s.timesteps[1], out)
