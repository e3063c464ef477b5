"""Learned schedules (GITS-style dynamic programming): beat the hand-made spacings on held-out noise on an exact
testbed, use exactly N model calls, round-trip as JSON, reject bad input."""
import json

import pytest
import torch

from fastsample import sample
from fastsample.sampling import reference_states
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.solvers import DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler
from fastsample.solvers.learned_schedule import LearnedSchedule, learn_schedule
from fastsample.testbeds import GaussianMixture

F64 = torch.float64
HAND_MADE = ("linspace", "karras", "logsnr", "time_uniform")


@pytest.fixture(scope="module")
def problem():
    gm = GaussianMixture.random(dim=8, components=3, seed=1, spread=1.0, schedule=DiscreteVP(make_betas()))
    g = torch.Generator().manual_seed(1)
    return gm, torch.randn(32, 8, generator=g, dtype=F64), torch.randn(200, 8, generator=g, dtype=F64)


def error(gm, sch, noise, **kw):
    sch.set_timesteps(**kw)
    ref = reference_states(gm, noise, sch, 20)[-1]
    x, calls = sample(gm, noise, sch, progress=False, **kw)
    assert calls == len(sch.timesteps)
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("cls, nfes", [(UniPCScheduler, (4, 5, 6, 8, 10)), (DPMSolverPlusPlusScheduler, (4, 5, 6))])
def test_dp_beats_every_hand_made_spacing_on_held_out_noise(problem, cls, nfes):
    gm, train, test = problem
    for n in nfes:
        s = learn_schedule(gm, cls(solver_order=3), train, n, validation_noise=test)
        learned = error(gm, cls(solver_order=3), test, timesteps=s.timesteps)
        assert s.validation_error == pytest.approx(learned, rel=1e-9)
        for spacing in HAND_MADE:
            assert learned < error(gm, cls(solver_order=3, spacing=spacing), test, num_inference_steps=n), (n, spacing)


def test_schedule_round_trips_and_sets_exactly_n_steps(problem, tmp_path):
    gm, train, _ = problem
    s = learn_schedule(gm, UniPCScheduler(), train, 5)
    assert len(s.timesteps) == 5 and len(s.sigmas) == 6 and s.sigmas[-1] == 0 and s.timesteps[0] == 999
    s.save(tmp_path / "s.json")
    again = LearnedSchedule.load(tmp_path / "s.json")
    assert again == s
    sch = again.apply(UniPCScheduler())
    assert sch.timesteps.tolist() == s.timesteps
    assert sch.sigmas.tolist() == pytest.approx(s.sigmas, rel=1e-6)


def test_bad_input(problem, tmp_path):
    gm, train, _ = problem
    with pytest.raises(ValueError, match="num_inference_steps must be an int in"):
        learn_schedule(gm, UniPCScheduler(solver_order=3), train, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        learn_schedule(gm, UniPCScheduler(), train, 5, method="magic")
    s = learn_schedule(gm, UniPCScheduler(), train, 4)
    s.sigmas = [s.sigmas[1], s.sigmas[0]] + s.sigmas[2:]
    s.save(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="strictly decreasing"):
        LearnedSchedule.load(tmp_path / "bad.json")
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    s.model_hash = "0" * 16
    with pytest.warns(UserWarning, match="learned for another model"):
        s.sigmas = sorted(s.sigmas, reverse=True)
        s.apply(UniPCScheduler(), model=net)


def test_a_scheduler_carries_the_schedule_into_a_pipeline(problem, tmp_path):
    """learned_timesteps in the config: set_timesteps(nfe) uses it, save_pretrained keeps it, another count errs;
    in a diffusers pipeline the learned 5-step schedule makes exactly 5 UNet calls."""
    from diffusers import DDPMPipeline, UNet2DModel

    gm, train, _ = problem
    s = learn_schedule(gm, UniPCScheduler(), train, 5)
    sch = s.scheduler(UniPCScheduler())
    sch.save_pretrained(tmp_path)
    sch = UniPCScheduler.from_pretrained(tmp_path)
    sch.set_timesteps(5)
    assert sch.timesteps.tolist() == s.timesteps
    with pytest.raises(ValueError, match="learned 5-step schedule"):
        sch.set_timesteps(6)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    seen = []
    unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1])))
    pipe = DDPMPipeline(unet=unet, scheduler=sch)
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=1, num_inference_steps=5, output_type="np")
    assert seen == s.timesteps


# ----------------------------------------------------------------------------------------------- method="gradient"
@pytest.mark.parametrize("cls, kw", [(UniPCScheduler, {"solver_order": 3}), (DPMSolverPlusPlusScheduler, {"solver_order": 3}),
                                     (DEISScheduler, {"solver_order": 3})])
def test_gradient_program_is_the_scheduler_and_its_gradient_is_exact(problem, cls, kw):
    """The differentiable solve equals the scheduler's own sampling, and its autograd gradient in the inner lambdas
    equals central differences of the loss."""
    from fastsample.solvers.learned_schedule import _GridValues, _Program

    gm, train, _ = problem
    sch = cls(**kw)
    sch.set_timesteps(5)
    prog = _Program(sch, sch.grid)
    inner = torch.tensor(sch.grid.lam[1:-1], dtype=F64)
    x = prog.run(gm, train, _GridValues.apply(inner, prog.values, 1e-6))
    ref, _ = sample(gm, train, cls(**kw), 5, progress=False)
    assert torch.allclose(x, ref, atol=1e-12)
    target = ref + 0.1
    # off the integer timesteps, where the discrete schedule's interpolation has kinks
    inner = (inner + 0.0137).requires_grad_(True)
    x = prog.run(gm, train, _GridValues.apply(inner, prog.values, 1e-6))
    (x - target).square().mean().backward()

    def loss(v):
        with torch.no_grad():
            return float((prog.run(gm, train, torch.tensor(prog.values(v), dtype=F64)) - target).square().mean())

    for k in range(len(inner)):
        up, down = inner.tolist(), inner.tolist()
        up[k] += 1e-5
        down[k] -= 1e-5
        assert inner.grad[k].item() == pytest.approx((loss(up) - loss(down)) / 2e-5, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("cls", [UniPCScheduler, DPMSolverPlusPlusScheduler])
def test_gradient_schedule_beats_hand_made_spacings(problem, cls):
    gm, train, test = problem
    s = learn_schedule(gm, cls(solver_order=3), train, 4, method="gradient", validation_noise=test,
                       gradient_options={"iterations": 120})
    assert s.method == "gradient" and s.train_loss < 0.5 * s.extra["first_loss"]
    assert any(t != round(t) for t in s.timesteps)  # exact fractional model times
    learned = error(gm, cls(solver_order=3), test, timesteps=s.timesteps)
    assert s.validation_error == pytest.approx(learned, rel=1e-9)
    for spacing in HAND_MADE:
        assert learned < error(gm, cls(solver_order=3, spacing=spacing), test, num_inference_steps=4), spacing


def test_fractional_learned_timesteps_reach_the_model(problem, tmp_path):
    gm, train, _ = problem
    s = learn_schedule(gm, UniPCScheduler(solver_order=2), train, 4, method="gradient",
                       gradient_options={"iterations": 5, "ball": 0.05})
    seen = []
    sch = s.scheduler(UniPCScheduler(solver_order=2))
    sch.save_pretrained(tmp_path)
    sch = UniPCScheduler.from_pretrained(tmp_path)
    x, calls = sample(lambda x, t: seen.append(float(t)) or gm(x, t), train, sch, 4, progress=False)
    assert calls == 4 and seen == pytest.approx(s.timesteps, abs=1e-3)
    assert sch.sigmas[:4].double().numpy() == pytest.approx(s.sigmas[:4], rel=1e-5)


def test_gradient_fit_keeps_its_best_iterate(problem):
    """With a step size far too large, Adam wanders off; the fit still returns the best grid it saw on the whole
    fitting set, which is never worse than the starting grid."""
    gm, train, _ = problem
    s = learn_schedule(gm, UniPCScheduler(solver_order=3), train, 4, method="gradient",
                       gradient_options={"iterations": 20, "lr": 3.0, "eval_every": 5})
    start = learn_schedule(gm, UniPCScheduler(solver_order=3), train, 4, method="gradient",
                           gradient_options={"iterations": 1, "lr": 1e-12})
    # here every later iterate is worse: the fit hands back the starting grid
    assert s.extra["best_iteration"] == 0 and s.train_loss == pytest.approx(start.train_loss, rel=1e-9)
    with pytest.raises(ValueError, match="eval_every"):
        learn_schedule(gm, UniPCScheduler(), train, 4, method="gradient", gradient_options={"eval_every": 0})


def test_gradient_fit_cosine_step_size_settles_where_a_constant_one_wanders(problem):
    """lr_schedule="cosine" lowers Adam's step size to 0 over the iterations: at a step size too large for the
    problem the last iterate is better than the constant step size's, which keeps bouncing (same seed, same batches)."""
    gm, train, _ = problem
    fits = {kind: learn_schedule(gm, UniPCScheduler(solver_order=3), train, 4, method="gradient", gradient_options={
        "iterations": 40, "lr": 0.3, "eval_every": 40, "scales": True, "coefficients": True, "lr_schedule": kind})
        for kind in ("constant", "cosine")}
    assert all(f.extra["best_iteration"] == 40 for f in fits.values())  # both end below the start: the last iterate
    assert fits["cosine"].train_loss < 0.9 * fits["constant"].train_loss
    assert fits["cosine"].extra["lr_schedule"] == "cosine"
    with pytest.raises(ValueError, match="lr_schedule must be one of .*'linear'"):
        learn_schedule(gm, UniPCScheduler(), train, 4, method="gradient", gradient_options={"lr_schedule": "linear"})


def test_gradient_bad_input(problem):
    gm, train, _ = problem
    with pytest.raises(ValueError, match="deterministic solver"):
        learn_schedule(gm, DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++"), train, 4, method="gradient")
    with pytest.raises(ValueError, match="only apply to method='gradient'"):
        learn_schedule(gm, UniPCScheduler(), train, 4, gradient_options={"ball": 0.1})
    with pytest.raises(ValueError, match="iterations"):
        learn_schedule(gm, UniPCScheduler(), train, 4, method="gradient", gradient_options={"iterations": 0})
    with pytest.raises(ValueError, match="ball"):
        learn_schedule(gm, UniPCScheduler(), train, 4, method="gradient", gradient_options={"ball": -1.0})


def test_learned_scales_round_trip_and_apply(problem, tmp_path):
    """Per-step prediction scales: fitted with the schedule, carried in the config, applied by step()."""
    from fastsample.solvers.learned_schedule import _GridValues, _Program

    gm, train, _ = problem
    s = learn_schedule(gm, UniPCScheduler(solver_order=2), train, 4, method="gradient",
                       gradient_options={"iterations": 30, "scales": True})
    assert len(s.scales) == 4 and all(v > 0 for v in s.scales) and s.scales != [1.0] * 4
    s.save(tmp_path / "s.json")
    assert LearnedSchedule.load(tmp_path / "s.json").scales == s.scales
    sch = s.scheduler(UniPCScheduler(solver_order=2))
    x, calls = sample(gm, train, sch, 4, progress=False)
    prog = _Program(sch, sch.grid)
    with torch.no_grad():
        y = prog.run(gm, train, _GridValues.apply(torch.tensor(sch.grid.lam[1:-1], dtype=F64), prog.values, 1e-6),
                     torch.tensor(s.scales, dtype=F64))
    # the fitted levels are fractional: the scheduler sends them to the model as float32 (the precision of a UNet's
    # time embedding), the program in float64, and this testbed's score depends on t smoothly
    assert calls == 4 and torch.allclose(x, y, atol=1e-5)
    assert not torch.allclose(x, sample(gm, train, UniPCScheduler(solver_order=2), 4, progress=False)[0], atol=1e-3)
    with pytest.raises(ValueError, match="learned_scales must be 4"):
        UniPCScheduler(learned_timesteps=s.timesteps, learned_scales=[1.0, 1.0]).set_timesteps(4)


def test_decoupled_model_time(problem, tmp_path):
    """Decoupled time: the model sees the fitted times, the solver the fitted levels; both travel in the config."""
    gm, train, test = problem
    s = learn_schedule(gm, UniPCScheduler(solver_order=2), train, 4, method="gradient", validation_noise=test,
                       gradient_options={"iterations": 40, "decouple_time": True})
    assert s.decoupled
    sch = s.scheduler(UniPCScheduler(solver_order=2))
    sch.save_pretrained(tmp_path)
    sch = UniPCScheduler.from_pretrained(tmp_path)
    seen = []
    x, calls = sample(lambda x, t: seen.append(float(t)) or gm(x, t), test, sch, 4, progress=False)
    assert calls == 4 and seen == pytest.approx(s.timesteps, abs=1e-3)
    assert sch.sigmas[:4].double().numpy() == pytest.approx(s.sigmas[:4], rel=1e-5)
    ref = reference_states(gm, test, sch, 20)[-1]
    assert float((x - ref).norm() / ref.norm()) == pytest.approx(s.validation_error, rel=1e-6)
    with pytest.raises(ValueError, match="one per level"):
        UniPCScheduler().set_timesteps(sigmas=s.sigmas[:-1], timesteps=s.timesteps[:3])


def test_validation_against_a_shared_fine_grid_teacher(problem):
    """scripts/learn_schedule.py scores every NFE's schedule against one teacher on the fine grid: its end points agree
    with the per-schedule teacher's, so the error is the same to well under a percent."""
    from fastsample.solvers.learned_schedule import validation_error

    gm, train, test = problem
    fine = UniPCScheduler(solver_order=3)
    fine.set_timesteps(60)
    reference = reference_states(gm, test, fine, 4)[-1]
    for n in (4, 6):
        s = learn_schedule(gm, UniPCScheduler(solver_order=3), train, n)
        own = validation_error(gm, UniPCScheduler(solver_order=3), s, test)
        shared = validation_error(gm, UniPCScheduler(solver_order=3), s, test, reference=reference)
        assert shared == pytest.approx(own, rel=5e-3), (n, own, shared)


def test_gradient_fit_on_a_teleported_schedule(problem, tmp_path):
    """With teleportation the fit starts from the closed-form jump and fits the steps left, against the converged
    solve over the full interval; the schedule carries all N levels (the teleported ones as they were), the scheduler
    reproduces the fit's loss with N - k model calls, and it beats the plain teleported grid on held-out noise."""
    from fastsample.solvers.teleport import GaussianStats

    gm, train, test = problem
    mean, cov = gm.moments()
    evals, evecs = torch.linalg.eigh(cov)
    stats = tmp_path / "g.safetensors"
    GaussianStats(mean, evecs.flip(1).contiguous(), evals.flip(0).clamp_min(0).contiguous(), (8,)).save(stats)

    def base():
        return UniPCScheduler(solver_order=3, teleport_stats=str(stats), teleport_fraction=0.2)

    def converged(noise):
        return sample(gm, noise, UniPCScheduler(solver_order=3), 200, progress=False)[0]

    def run(sch, noise):
        return sample(gm, sch.prepare_latents(noise, 10), sch, 10, progress=False)

    target = converged(train)
    with pytest.raises(ValueError, match="needs target="):
        learn_schedule(gm, base(), train, 10, method="gradient")
    s = learn_schedule(gm, base(), train, 10, method="gradient",
                       gradient_options={"iterations": 60, "target": target, "scales": True})
    assert s.extra["teleported_steps"] == 2 and len(s.timesteps) == 10 and s.scales[:2] == [1.0, 1.0]
    sch = s.scheduler(base())
    x, calls = run(sch, train)
    assert calls == 8 and float((x - target).square().mean()) == pytest.approx(s.train_loss, rel=1e-4)
    assert s.train_loss < s.extra["initial_loss"]
    ref = converged(test)
    learned, plain = (float((run(c, test)[0] - ref).norm() / ref.norm()) for c in (sch, base()))
    assert learned < plain, (learned, plain)


def test_gradient_fit_chooses_its_iterate_on_validation(problem):
    """With validation=(noise, teacher end points) the iterate is chosen on those: the chosen grid's validation loss is
    what the scheduler gives there, and never above the starting grid's."""
    gm, train, test = problem

    def converged(noise):
        return sample(gm, noise, UniPCScheduler(solver_order=3), 200, progress=False)[0]

    val, val_ref = test[:50], converged(test[:50])
    s = learn_schedule(gm, UniPCScheduler(solver_order=3), train, 4, method="gradient",
                       gradient_options={"iterations": 40, "eval_every": 5, "target": converged(train),
                                         "validation": (val, val_ref)})
    assert s.extra["selected_on"] == "validation"
    fitted = float((sample(gm, val, UniPCScheduler(solver_order=3), progress=False, **s.grid_kwargs())[0]
                    - val_ref).square().mean())
    plain = float((sample(gm, val, UniPCScheduler(solver_order=3), 4, progress=False)[0] - val_ref).square().mean())
    assert s.extra["selection_loss"] == pytest.approx(fitted, rel=1e-4) and fitted <= plain * (1 + 1e-9)
    with pytest.raises(ValueError, match="validation must be"):
        learn_schedule(gm, UniPCScheduler(), train, 4, method="gradient",
                       gradient_options={"iterations": 1, "validation": (val, val_ref[:3])})


def test_schedule_files_are_validated_when_loaded(problem, tmp_path):
    """Issue 20 F12: NaN sigmas passed check(); a broken file gave a raw KeyError or JSONDecodeError."""
    import json

    gm, train, _ = problem
    s = learn_schedule(gm, UniPCScheduler(), train, 4)
    good = json.loads(json.dumps(s.__dict__))
    cases = [({"sigmas": [float("nan")] + good["sigmas"][1:]}, "sigmas must be a list of finite numbers"),
             ({"timesteps": [-5.0] + good["timesteps"][1:]}, "timesteps .* must be non-negative"),
             ({"scales": [1.0, 0.0, 1.0, 1.0]}, r"scales must be 4 numbers in \(0, 10\]"),
             ({"nfe": 0}, "nfe must be a positive integer")]
    for i, (change, match) in enumerate(cases):
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=f"bad{i}.json: {match}"):
            LearnedSchedule.load(path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not a learned schedule \\(not JSON"):
        LearnedSchedule.load(tmp_path / "broken.json")
    (tmp_path / "keys.json").write_text(json.dumps({"timesteps": [1.0]}))
    with pytest.raises(ValueError, match="keys.json is not a learned schedule: it needs the keys"):
        LearnedSchedule.load(tmp_path / "keys.json")
    decoupled = LearnedSchedule(**{**good, "extra": {"decoupled_time": True}, "timesteps": [1e9, 500.0, 200.0, 50.0]})
    with pytest.raises(ValueError, match=r"must lie in \[0, 999\]"):  # out-of-range model times are not applied
        decoupled.apply(UniPCScheduler())


def test_weights_hash_is_taken_through_wrappers():
    """Issue 20 F12: the shipped schedules recorded model_hash "" because a lambda was passed."""
    import functools

    from fastsample.solvers.learned_schedule import model_hash

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3)
    h = model_hash(net)
    assert len(h) == 16
    assert model_hash(lambda x, t: net(x)) == model_hash(functools.partial(net.forward)) == model_hash(net.forward) == h

    class Wrapper:
        def __init__(self, model):
            self.model = model

        def __call__(self, x, t):
            return self.model(x)

    assert model_hash(Wrapper(net)) == h
    assert model_hash(lambda x, t: x) == ""
    other = torch.nn.Linear(3, 3)
    assert model_hash(other) != h
    # a module's declared conversion revision (hash_salt) is part of the hash: the same weights behind a corrected
    # conversion do not match what the old one was fitted to
    salted = torch.nn.Linear(3, 3)
    salted.load_state_dict(net.state_dict())
    salted.hash_salt = "conversion/2"
    second = model_hash(salted)
    assert second != h and model_hash(lambda x, t: salted(x)) == second
    salted.hash_salt = "conversion/3"
    assert model_hash(salted) not in (h, second)


def test_a_shipped_schedule_used_with_other_weights_warns(tmp_path):
    """Every shipped schedule records the weights it was fitted to, as its JSON and as its scheduler folder
    (fitted_model_hash); LearnedSchedule.apply and fastsample.sample warn for other weights, and a save/load keeps
    the hash."""
    from pathlib import Path

    from fastsample import sample

    root = Path(__file__).resolve().parent.parent / "learned" / "fmnist-large"
    shipped = sorted(root.glob("*.json"))
    assert shipped
    torch.manual_seed(0)
    other = torch.nn.Conv2d(1, 1, 1)
    for path in shipped:
        s = LearnedSchedule.load(path)
        assert len(s.model_hash) == 16, path
        folder = UniPCScheduler.from_pretrained(path.with_suffix("")) if "unipc" in path.name else None
        if folder is not None:
            assert folder.config.fitted_model_hash == s.model_hash, path
    s = LearnedSchedule.load(root / "unipc3-nfe5.json")
    with pytest.warns(UserWarning, match="learned for another model"):
        s.apply(UniPCScheduler(), model=other)
    sch = UniPCScheduler.from_pretrained(root / "unipc3-nfe5")
    sch.save_pretrained(tmp_path / "copy")
    moved = UniPCScheduler.from_pretrained(tmp_path / "copy")
    assert moved.config.fitted_model_hash == s.model_hash
    model = lambda x, t: other(x)  # noqa: E731
    with pytest.warns(UserWarning, match="fitted schedule or ratios were learned for another model"):
        sample(model, torch.randn(1, 1, 4, 4), moved, 5, progress=False)
    with pytest.raises(ValueError, match="fitted_model_hash is the weights hash of what the config carries fitted"):
        UniPCScheduler.from_config({**UniPCScheduler().config, "fitted_model_hash": 5})


# ------------------------------------------------------------------------------------------- learned coefficients
@pytest.mark.parametrize("cls, kw", [(UniPCScheduler, {"solver_order": 3}), (DPMSolverPlusPlusScheduler, {"solver_order": 3}),
                                     (DEISScheduler, {"solver_order": 3})])
def test_learned_coefficients_are_the_programs_offsets_in_every_path(problem, cls, kw, tmp_path):
    """Offsets of the rules' values: the scheduler (after a save_pretrained round trip) and the differentiable
    program agree to float64 round-off; with zero offsets each is the plain solver."""
    from fastsample.solvers.learned_schedule import _GridValues, _Program

    gm, train, _ = problem
    sch = cls(**kw)
    sch.set_timesteps(5)
    prog = _Program(sch, sch.grid)
    offsets = 0.02 * torch.sin(torch.arange(len(prog.slot_index), dtype=F64) + 1.0)
    coefficients = prog.coefficients(offsets)
    assert [len(c["predictor"]) for c in coefficients] == [1 + n for _, _, _, n in prog.steps]
    with torch.no_grad():
        vals = _GridValues.apply(torch.tensor(sch.grid.lam[1:-1], dtype=F64), prog.values, 1e-6)
        y = prog.run(gm, train, vals, coefficient_offsets=offsets)
        plain = prog.run(gm, train, vals, coefficient_offsets=torch.zeros_like(offsets))
    carried = cls(**kw, learned_coefficients=coefficients)
    carried.save_pretrained(tmp_path)
    carried = cls.from_pretrained(tmp_path)
    x, calls = sample(gm, train, carried, 5, progress=False)
    assert calls == 5 and torch.allclose(x, y, atol=1e-12)
    assert torch.allclose(plain, sample(gm, train, cls(**kw), 5, progress=False)[0], atol=1e-12)
    assert (x - plain).abs().max() > 1e-3  # the offsets change the result


def test_learned_coefficients_beat_the_learned_schedule_on_held_out_noise(problem, tmp_path):
    """Fitting the rules' values with the schedule cuts the held-out error below the schedule (and scales) alone; the
    fit travels as learned_coefficients through save_pretrained and gives the error it reports."""
    gm, train, test = problem
    opts = {"iterations": 120, "scales": True}
    alone = learn_schedule(gm, UniPCScheduler(solver_order=3), train, 4, method="gradient", validation_noise=test,
                           gradient_options=opts)
    s = learn_schedule(gm, UniPCScheduler(solver_order=3), train, 4, method="gradient", validation_noise=test,
                       gradient_options={**opts, "coefficients": True})
    assert s.coefficients is not None and len(s.coefficients) == 4 and s.extra["coefficients"]
    assert s.validation_error < 0.8 * alone.validation_error, (s.validation_error, alone.validation_error)
    s.save(tmp_path / "s.json")
    assert LearnedSchedule.load(tmp_path / "s.json").coefficients == s.coefficients
    sch = s.scheduler(UniPCScheduler(solver_order=3))
    sch.save_pretrained(tmp_path / "folder")
    sch = UniPCScheduler.from_pretrained(tmp_path / "folder")
    assert sch.config.learned_coefficients == s.coefficients
    assert error(gm, sch, test, num_inference_steps=4) == pytest.approx(s.validation_error, rel=1e-6)


def test_learned_coefficients_bad_input(problem):
    gm, train, _ = problem
    with pytest.raises(ValueError, match=r"learned_coefficients must hold one entry per step \(4\), got 2"):
        UniPCScheduler(learned_coefficients=[{}, {}]).set_timesteps(4)
    with pytest.raises(ValueError, match=r"learned_coefficients\[0\]\['predictor'\] must be a list of finite numbers"):
        UniPCScheduler(learned_coefficients=[{"predictor": [float("nan")]}] * 4).set_timesteps(4)
    with pytest.raises(ValueError, match=r"learned_coefficients\[1\] must be a dict with the keys"):
        UniPCScheduler(learned_coefficients=[{}, {"predictr": []}, {}, {}]).set_timesteps(4)
    sch = UniPCScheduler(solver_order=2, learned_coefficients=[{"predictor": [0.0, 0.0, 0.0, 0.0]}] * 4)
    with pytest.raises(ValueError, match=r"learned_coefficients\[0\]\['predictor'\] holds 4 offsets, but the step's "
                                         r"predictor rule has 2 values"):
        sample(gm, train, sch, 4, progress=False)
    from fastsample.solvers import HeunScheduler
    with pytest.raises(ValueError, match="learned coefficients need a solver that takes the generic multistep step"):
        HeunScheduler(learned_coefficients=[{}] * 2).set_timesteps(2)
    fitted = UniPCScheduler(learned_coefficients=[{}] * 4)
    with pytest.raises(ValueError, match="already carries learned_coefficients"):
        learn_schedule(gm, fitted, train, 4, method="gradient", gradient_options={"iterations": 1})


@pytest.mark.parametrize("cls", [UniPCScheduler, DPMSolverPlusPlusScheduler])
def test_learned_coefficients_on_a_flow_schedule(cls):
    """On FlowMatch's grid (its first level pure noise) the scheduler adds the offsets as the program does."""
    from fastsample import zoo
    from fastsample.schedules import RectifiedFlow
    from fastsample.solvers.learned_schedule import _GridValues, _Program

    gm = GaussianMixture.random(dim=8, components=3, seed=1, spread=1.0, schedule=RectifiedFlow(t_min=0.0),
                                prediction_type="flow_prediction", time_scale=1000.0)
    train = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    sch = cls(**zoo.FLOW_CONFIG, solver_order=3)
    sch.set_timesteps(5)
    prog = _Program(sch, sch.grid)
    offsets = 0.02 * torch.sin(torch.arange(len(prog.slot_index), dtype=F64) + 1.0)
    with torch.no_grad():
        y = prog.run(gm, train, _GridValues.apply(torch.tensor(sch.grid.lam[1:-1], dtype=F64), prog.values, 1e-6),
                     coefficient_offsets=offsets)
    x, _ = sample(gm, train, cls(**zoo.FLOW_CONFIG, solver_order=3, learned_coefficients=prog.coefficients(offsets)),
                  5, progress=False)
    assert torch.allclose(x, y, atol=1e-12)


def test_gradient_fit_on_a_flow_grid_refuses_a_noise_prediction_solver():
    from fastsample import zoo
    from fastsample.schedules import RectifiedFlow

    gm = GaussianMixture.random(dim=8, components=3, seed=1, spread=1.0, schedule=RectifiedFlow(t_min=0.0),
                                prediction_type="flow_prediction", time_scale=1000.0)
    with pytest.raises(ValueError, match="needs a data-prediction solver .*DEISScheduler predicts the noise"):
        learn_schedule(gm, DEISScheduler(**zoo.FLOW_CONFIG, solver_order=3), torch.randn(4, 8, dtype=F64), 4,
                       method="gradient", gradient_options={"iterations": 1})


def test_shipped_fits_record_the_shipped_weights():
    """Every schedule, scale set and DC ratio file shipped for fmnist-large was fitted to the weights the zoo ships
    now (or, under learned/fmnist-large-flow, to its flow view): a fit left over from older weights fails here."""
    from pathlib import Path

    from fastsample import zoo
    from fastsample.solvers.dc_solver import CPR
    from fastsample.solvers.learned_schedule import model_hash

    root = Path(__file__).resolve().parent.parent
    shipped = model_hash(zoo.load("fmnist-large"))
    expected = {"learned/fmnist-large": shipped,
                "learned/fmnist-large-flow": model_hash(zoo.load("fmnist-large", parameterization="flow")),
                "dc/fmnist-large": shipped}
    checked = 0
    for folder, want in expected.items():
        assert len(want) == 16, folder
        for path in sorted((root / folder).rglob("*.json")):
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                continue
            got = record.get("fitted_model_hash", record.get("model_hash"))
            if (path.name == "scheduler_config.json" or record.get("method") == "dc-solver-cpr"
                    or path.parent.name == Path(folder).name):
                assert got == want, f"{path.relative_to(root)} was fitted to weights {got}, the shipped are {want}"
                if path.name == "cpr.json":  # the recorded weights do not get in the way of loading it
                    assert CPR.load(path).predict(7)[-1] == pytest.approx(CPR.from_dict(record).predict(7)[-1])
                checked += 1
    assert checked >= 40
