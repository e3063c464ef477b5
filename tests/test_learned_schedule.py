"""Learned schedules (GITS-style dynamic programming): beat the hand-made spacings on held-out noise on an exact
testbed, use exactly N model calls, round-trip as JSON, reject bad input."""
import pytest
import torch

from fastsample import sample
from fastsample.sampling import reference_states
from fastsample.schedules import DiscreteVP, make_betas
from fastsample.solvers import DPMSolverPlusPlusScheduler, UniPCScheduler
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
