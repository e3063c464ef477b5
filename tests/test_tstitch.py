"""T-Stitch: routing by noise level under any scheduler and schedule, drop-in use in a diffusers pipeline, the
history-restart option, bad input."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNet2DModel

from conftest import smooth_model
from fastsample import sample
from fastsample.guidance.tstitch import StitchedModel
from fastsample.solvers import DCSolverScheduler, DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler


def unet(width, seed):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(width, 2 * width),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("cls", [DPMSolverPlusPlusScheduler, DEISScheduler, UniPCScheduler, DCSolverScheduler,
                                 DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_fraction_04_of_10_steps_is_the_4_noisiest(cls, latents):
    stitched = StitchedModel([smooth_model, smooth_model], [0.4])
    x, nfe = sample(stitched, latents, cls(), 10, progress=False)
    assert nfe == 10 and stitched.calls == [4, 6] and torch.isfinite(x).all()


def test_three_models_and_a_teleported_schedule_route_by_noise_level(latents, tmp_path):
    from fastsample.solvers.teleport import GaussianStats

    stitched = StitchedModel([smooth_model] * 3, [0.3, 0.6])
    sample(stitched, latents, UniPCScheduler(), 10, progress=False)
    assert stitched.calls == [3, 4, 3]  # timesteps 999 899 799 | 699 599 500 400 | 300 200 100
    GaussianStats.from_samples(torch.randn(100, *latents.shape[1:])).save(tmp_path / "s.safetensors")
    tele = UniPCScheduler(teleport_stats=str(tmp_path / "s.safetensors"), teleport_fraction=0.3)
    stitched = StitchedModel([smooth_model, smooth_model], [0.4])
    sample(stitched, tele.prepare_latents(latents, 10), tele, 10, progress=False)
    assert stitched.calls == [1, 6]  # 699 is the only teleported-schedule level at t/1000 >= 0.6


def test_ddpm_pipeline_takes_the_stitched_unet():
    small, large = unet(4, 0), unet(8, 1)
    stitched = StitchedModel([small, large], [0.4])
    assert stitched.config.sample_size == 8 and stitched.dtype == torch.float32
    pipe = DDPMPipeline(unet=stitched, scheduler=UniPCScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3) and stitched.calls == [2, 3]


def test_history_is_kept_by_default_and_restarts_on_request(latents):
    a, b = (lambda x, t: smooth_model(x, t)), (lambda x, t: 1.1 * smooth_model(x, t))
    kept, _ = sample(StitchedModel([a, b], [0.5]), latents, UniPCScheduler(solver_order=3), 10, progress=False)
    sched = UniPCScheduler(solver_order=3)
    restarted, _ = sample(StitchedModel([a, b], [0.5], restart=sched), latents, sched, 10, progress=False)
    assert torch.isfinite(restarted).all() and not torch.equal(kept, restarted)


@pytest.mark.parametrize("n, fractions, match", [(3, [0.6, 0.3], "strictly increasing"), (2, [1.0], "inside \\(0, 1\\)"),
                                                 (2, [0.0], "inside \\(0, 1\\)"), (2, [0.2, 0.5], "one fraction fewer")])
def test_bad_fractions(n, fractions, match):
    with pytest.raises(ValueError, match=match):
        StitchedModel([smooth_model] * n, fractions)


def test_models_with_other_input_shapes_are_rejected():
    torch.manual_seed(0)
    other = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(4, 8),
                        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="input shapes differ"):
        StitchedModel([unet(4, 0), other], [0.4])


@pytest.mark.slow
def test_sweep_script_records_quality_cells_then_interleaved_timings(tmp_path):
    """experiments/tstitch_sweep.py on the shipped models: one engine cell per fraction and metric (FID against the
    train split, trajectory error against the large model's converged solve), the small model's call count by noise
    level, then one timing record per fraction; a rerun adds nothing."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "t.jsonl"
    cmd = [sys.executable, "experiments/tstitch_sweep.py", "--nfe", "4", "--fractions", "0", "0.5", "1", "--num", "24",
           "--num-rmse", "4", "--batch-size", "12", "--time-batch", "4", "--time-repeats", "2", "--out", str(out),
           "--table", str(tmp_path / "t.md")]
    subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    rmse = [r for r in records if r.get("metric") == "rmse"]
    fids, times = [r for r in records if r.get("metric") == "fid"], [r for r in records if "ms_per_image" in r]
    # UniPC's 4 steps sit at t = 999, 749, 500, 250: the small model serves t / 1000 >= 1 - 0.5, three of them
    assert [(r["scheduler"], r.get("small_calls")) for r in fids] == [("fraction 0", None), ("fraction 0.5", 3),
                                                                     ("fraction 1", 4)]
    assert [r["num"] for r in rmse] == [4, 4, 4] and rmse[0]["rmse"] < rmse[2]["rmse"]
    assert len({r["weights"] for r in fids}) == 2  # the large model alone; the pair
    assert [r["fraction"] for r in times] == [0.0, 0.5, 1.0] and all(r["ms_per_image"] > 0 for r in times)
    text = (tmp_path / "t.md").read_text()
    assert "speed-up" in text and "| 4 | 0.5 |" in text
    subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    assert len(out.read_text().splitlines()) == len(records)
