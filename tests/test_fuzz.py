"""Property-based input fuzzing (issue 20): scheduler configs, step counts, custom sigmas and timesteps, dtypes and
artefact files.  The property: an input either raises ValueError or RuntimeError with a message, or gives a finite
result equal to the solver run by the core loop on the scheduler's own grid, and custom levels are the ones
integrated.  Never another exception, a NaN, or a silent change of the grid.

The examples are derandomized (the same cases on every run, so CI cannot flake) and small (2 x 1 x 4 x 4 latents),
about 2,500 cases in all."""
import json
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import smooth_model
from fastsample.registry import solvers
from fastsample.sampling import integrate

pytestmark = pytest.mark.usefixtures("one_thread")

FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
                database=None, print_blob=False)
CLASSES = [info.scheduler for info in solvers()]
ALLOWED = (ValueError, RuntimeError)
ODD_NUMBERS = [0, -1, 1, 2, 1e-12, 0.5, 1000.7, 1e9, float("nan"), float("inf"), -float("inf"), "1000", None, True]


def maybe_nan(lo, hi):
    return st.one_of(st.floats(lo, hi), st.just(math.nan))


def numbers(lo, hi):
    return st.one_of(st.floats(lo, hi), st.sampled_from(ODD_NUMBERS))


CONFIG = st.fixed_dictionaries({}, optional={
    "num_train_timesteps": st.one_of(st.integers(-2, 3000), st.sampled_from(ODD_NUMBERS)),
    "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "cosine", 3]),
    "beta_start": numbers(0.0, 0.01),
    "beta_end": numbers(0.005, 0.05),
    "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction", "flow_prediction", "x0", None]),
    "timestep_spacing": st.sampled_from(["linspace", "leading", "trailing", "karras", "logsnr", "uniform", ""]),
    "final_sigmas_type": st.sampled_from(["zero", "sigma_min", "none"]),
    "solver_order": st.one_of(st.integers(-1, 5), st.sampled_from([2.5, "2"])),
    "steps_offset": st.one_of(st.integers(-5, 2000), st.sampled_from([1.5, "1"])),
    "use_karras_sigmas": st.booleans(),
    "use_exponential_sigmas": st.booleans(),
    "use_flow_sigmas": st.booleans(),
    "flow_shift": numbers(-1.0, 10.0),
    "thresholding": st.booleans(),
    "sample_max_value": numbers(-2.0, 5.0),
    "dynamic_thresholding_ratio": numbers(-0.5, 1.5),
    "lower_order_final": st.booleans(),
    "rescale_betas_zero_snr": st.booleans(),
})
DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])


def make(cls, config):
    """Construct ``cls(**config)``, keeping only the keys it takes (the rest would be an unrelated TypeError)."""
    from fastsample.registry import config_keys

    names = config_keys(cls)
    return cls(**{k: v for k, v in config.items() if k in names})


def solve(s, x, **set_kw):
    """The scheduler's loop, then the same solver and grid through the core loop: both end points."""
    s.set_timesteps(**set_kw)
    timesteps = list(s.timesteps)
    y = x.clone()
    for t in timesteps:
        y = s.step(smooth_model(y, t), t, y).prev_sample
    g = s.grid
    if (g.alpha[0] == 0.0 and s.solver.prediction == "eps") or s.scales is not None or s.solver.stochastic:
        return y, None  # the exact first step from pure noise, learned scales and SDE noise are tested apart
    at_node = {node: t for (node, _), t in zip(s.solver.calls(g), timesteps)}  # the model time of each node
    core = integrate(smooth_model, x.to(torch.float64 if x.dtype == torch.float64 else torch.float32), s.solver, g,
                     s.config.prediction_type, model_time=lambda i: at_node[i], threshold=s.threshold)
    return y, core.to(x.dtype)


def check_outcome(run):
    """``run()`` raises an allowed error with a message, or returns (result, core): finite and equal."""
    try:
        out, core = run()
    except ALLOWED as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        event(f"refused: {re.sub(r'/[^ :]*', '<path>', str(e))[:40]}")
        return None
    event("solved")
    assert torch.isfinite(out.float()).all(), "a non-finite result without an error"
    if core is not None and out.dtype in (torch.float32, torch.float64):  # half types round x at every step
        tol = 1e-5 if out.dtype == torch.float64 else 1e-4
        scale = 1 + float(core.float().abs().max())
        assert float((out.float() - core.float()).abs().max()) <= tol * scale, "the scheduler left the core's solve"
    return out


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
@settings(FUZZ, max_examples=250)
@given(config=CONFIG, n=st.one_of(st.integers(-2, 30), st.sampled_from([0, 999, 1000, 1001, 2.0, "5", None])),
       dtype=DTYPES)
def test_any_config_and_step_count(cls, config, n, dtype):
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)

    def run():
        s = make(cls, config)
        return solve(s, x, num_inference_steps=n)

    check_outcome(run)


LEVEL = st.one_of(st.floats(-5.0, 2000.0), st.sampled_from([0.0, 1e-6, 0.0292, 157.4, 1e6, float("nan"),
                                                           float("inf")]))
# levels inside the trained range (VE sigma 0.0100 to 157.4), strictly decreasing: most of these must solve
GOOD_LEVELS = st.lists(st.floats(0.0101, 157.0), min_size=1, max_size=8, unique=True).map(
    lambda v: sorted(v, reverse=True))


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
@settings(FUZZ, max_examples=150)
@given(data=st.data(), final_zero=st.booleans(), flow=st.booleans())
def test_any_custom_sigmas_and_timesteps(cls, data, final_zero, flow):
    wild = data.draw(st.integers(0, 3), "wild") == 0  # a quarter of the cases: any list at all
    sigmas = data.draw(st.lists(LEVEL, min_size=0, max_size=8) if wild else GOOD_LEVELS, "sigmas")
    good_times = st.lists(st.floats(0.0, 999.0), min_size=len(sigmas), max_size=len(sigmas), unique=True).map(
        lambda v: sorted(v, reverse=True))
    timesteps = data.draw(st.one_of(st.none(), good_times, st.lists(st.floats(-100.0, 1200.0), max_size=8)),
                          "timesteps")
    if final_zero:
        sigmas = sigmas + [0.0]
    if flow:
        sigmas = [v / 160 if math.isfinite(v) else v for v in sigmas]
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    kw = {"sigmas": sigmas} if timesteps is None else {"sigmas": sigmas, "timesteps": timesteps}
    config = dict(use_flow_sigmas=True, prediction_type="flow_prediction") if flow else {}

    def run():
        s = make(cls, {**config, "final_sigmas_type": "zero"})
        out = solve(s, x, **kw)
        levels = [v for v in sigmas if v != 0.0]
        if not flow:  # VP: the levels integrated are exactly the ones asked for (float32), none clamped or dropped
            assert np.allclose(s.sigmas[:-1].double().numpy(), levels, rtol=1e-6, atol=0), (s.sigmas, levels)
        if timesteps is not None:
            assert np.allclose(s.timesteps.double().numpy(), timesteps, rtol=1e-6), (s.timesteps, timesteps)
        return out

    check_outcome(run)


WILD = st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-10, 10), st.text(max_size=3),
                 st.lists(st.floats(), max_size=4))


@settings(FUZZ, max_examples=250)
@given(data=st.data(), nfe=st.integers(1, 6), decoupled=st.booleans(), mutate=st.sampled_from(
    [None, None, "timesteps", "sigmas", "nfe", "scales", "solver", "drop", "extra key", "not json"]))
def test_any_learned_schedule_file(tmp_path_factory, data, nfe, decoupled, mutate):
    from fastsample.solvers import UniPCScheduler
    from fastsample.solvers.learned_schedule import LearnedSchedule

    times = data.draw(st.lists(st.floats(1.0, 999.0), min_size=nfe, max_size=nfe, unique=True), "times")
    levels = data.draw(st.lists(st.floats(0.0101, 157.0), min_size=nfe, max_size=nfe, unique=True), "levels")
    d = {"timesteps": sorted(times, reverse=True), "sigmas": sorted(levels, reverse=True) + [0.0],
         "solver": "UniPCScheduler", "nfe": nfe, "method": "gradient", "train_loss": 0.1, "validation_error": None,
         "model_hash": "", "extra": {"decoupled_time": decoupled},
         "scales": data.draw(st.one_of(st.none(), st.lists(st.floats(0.5, 1.5), min_size=nfe, max_size=nfe)))}
    if mutate == "drop":
        d.pop(data.draw(st.sampled_from(sorted(d))))
    elif mutate == "extra key":
        d["surprise"] = 1
    elif mutate is not None and mutate != "not json":
        d[mutate] = data.draw(st.one_of(WILD, st.lists(WILD, min_size=nfe, max_size=nfe + 1)), mutate)
    path = tmp_path_factory.mktemp("sched") / "s.json"
    path.write_text("{" if mutate == "not json" else json.dumps(d))
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))

    def run():
        s = LearnedSchedule.load(path)
        sch = UniPCScheduler(final_sigmas_type="zero", learned_scales=s.scales)
        return solve(sch, x, **s.grid_kwargs())

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "learned for <another solver>" is a warning, not a failure
        check_outcome(run)


@settings(FUZZ, max_examples=250)
@given(data=st.data(), shape=st.sampled_from([[4], [2, 2]]), rank=st.integers(1, 4), fraction=st.floats(0.1, 0.9),
       mutate=st.sampled_from([None, None, "mean", "evals", "evecs", "shape", "count", "drop"]))
def test_any_statistics_file(tmp_path_factory, data, shape, rank, fraction, mutate):
    from safetensors.torch import save_file

    from fastsample.solvers import UniPCScheduler

    F64 = torch.float64
    q = torch.linalg.qr(torch.randn(4, rank, generator=torch.Generator().manual_seed(3), dtype=F64))[0]
    tensors = {"mean": torch.tensor(data.draw(st.lists(st.floats(-2, 2), min_size=4, max_size=4)), dtype=F64),
               "evecs": q.contiguous(),
               "evals": torch.tensor(sorted(data.draw(st.lists(st.floats(0, 3), min_size=rank, max_size=rank)),
                                            reverse=True), dtype=F64)}
    meta = {"shape": json.dumps(shape), "count": "10"}
    if mutate in ("mean", "evals"):
        n = data.draw(st.integers(0, 5))
        tensors[mutate] = torch.tensor(data.draw(st.lists(maybe_nan(-3, 3), min_size=n, max_size=n)), dtype=F64)
    elif mutate == "evecs":
        tensors["evecs"] = tensors["evecs"] * data.draw(st.sampled_from([0.0, 0.5, 2.0, math.nan]))
    elif mutate in ("shape", "count"):
        meta[mutate] = data.draw(st.sampled_from(["[4", "x", '"4"', "[-4]", "[0, 4]", "[5]", "[4.5]", "null", "[]"]))
    elif mutate == "drop":
        tensors.pop(data.draw(st.sampled_from(sorted(tensors))))
    path = tmp_path_factory.mktemp("stats") / "g.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(4), dtype=F64)

    def run():
        s = UniPCScheduler(teleport_stats=str(path), teleport_fraction=round(fraction, 2), final_sigmas_type="zero")
        s.set_timesteps(6)
        y = s.prepare_latents(x, 6)
        for t in s.timesteps:
            y = s.step(smooth_model(y, t), t, y).prev_sample
        return y, None

    check_outcome(run)
