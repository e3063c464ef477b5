"""Our schedulers as drop-ins for diffusers' flow-matching pipelines (SD3, Flux, and their img2img), built from tiny
local components (nothing is downloaded), and against FlowMatchEulerDiscreteScheduler (FME) on its own configs.

The standard swap, ``pipe.scheduler = Ours.from_config(pipe.scheduler.config)``, must give the same flow schedule
as FME: its grid, its shift or ``mu``, custom ``sigmas`` shifted as FME shifts them, and DPM-Solver++ order 1 then
equals FME's Euler step.  The transformer is only observed, through a forward pre-hook that records its timesteps.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from fastsample.solvers import DCSolverScheduler, DEISScheduler, DPMSolverPlusPlusScheduler, UniPCScheduler  # noqa: E402

from test_pipelines import MAX_LEN, PROMPT, SIZE, _write_tokenizer  # noqa: E402

# every scheduler, with the options a user would pick (bh1 and DC: the finite-at-sigma-1 cases)
SCHEDULERS = [(DPMSolverPlusPlusScheduler, {}), (DPMSolverPlusPlusScheduler, {"solver_order": 3}),
              (DPMSolverPlusPlusScheduler, {"algorithm_type": "sde-dpmsolver++"}),
              (DEISScheduler, {}), (UniPCScheduler, {}), (UniPCScheduler, {"solver_type": "bh1", "solver_order": 3}),
              (DCSolverScheduler, {})]
IDS = ["dpm2", "dpm3", "sde-dpm", "deis", "unipc", "unipc-bh1", "dc"]
SD3_FME = dict(shift=3.0)
FLUX_FME = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


class Calls:
    """The timesteps a transformer is called with (one entry per call)."""

    def __init__(self, module):
        self.module, self.t = module, []

    def __enter__(self):
        def hook(_, args, kwargs):
            self.t.append(float(torch.as_tensor(kwargs["timestep"]).reshape(-1)[0]))
        self.handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _clip(vocab_size, projection):
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=MAX_LEN, projection_dim=16, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def _vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, sample_size=SIZE, shift_factor=0.1, scaling_factor=0.5,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("clip-tokenizer")
    vocab_size = _write_tokenizer(tok_dir)
    clip_tok = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MAX_LEN)
    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=SIZE // 2, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16).eval()
    sd3_parts = dict(transformer=sd3, vae=_vae(), text_encoder=_clip(vocab_size, True), tokenizer=clip_tok,
                     text_encoder_2=_clip(vocab_size, True), tokenizer_2=clip_tok, text_encoder_3=None,
                     tokenizer_3=None)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "dog": 5}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    t5_tok = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>",
                                     unk_token="<unk>", model_max_length=MAX_LEN)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    flux_parts = dict(transformer=flux, vae=_vae(), text_encoder=_clip(vocab_size, False), tokenizer=clip_tok,
                      text_encoder_2=t5, tokenizer_2=t5_tok)
    return {"sd3": sd3_parts, "flux": flux_parts}


def make_pipe(components, kind, scheduler, img2img=False):
    cls = {("sd3", False): StableDiffusion3Pipeline, ("sd3", True): StableDiffusion3Img2ImgPipeline,
           ("flux", False): FluxPipeline, ("flux", True): FluxImg2ImgPipeline}[kind, img2img]
    pipe = cls(**components[kind], scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fme(kind):
    return FlowMatchEulerDiscreteScheduler(**(SD3_FME if kind == "sd3" else FLUX_FME))


def run(pipe, kind, seed=0, **kw):
    kw = {"num_inference_steps": 4, "height": SIZE, "width": SIZE, "output_type": "latent", **kw}
    if kind == "flux":
        kw.setdefault("max_sequence_length", MAX_LEN)
        kw.setdefault("guidance_scale", 3.5)
    else:
        kw.setdefault("guidance_scale", 2.0)
    with Calls(pipe.transformer) as calls:
        out = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kw).images
    return out, calls.t


@pytest.fixture(scope="module")
def init_image():
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- the swap
@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("cls, kw", SCHEDULERS, ids=IDS)
def test_swap_by_from_config_runs_on_the_flow_schedule(kind, cls, kw, components):
    pipe = make_pipe(components, kind, fme(kind))
    _, theirs = run(pipe, kind)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kw)
    cfg = pipe.scheduler.config
    assert cfg.prediction_type == "flow_prediction" and cfg.spacing == "flow_match"
    assert cfg.flow_shift == (3.0 if kind == "sd3" else 1.0)
    if kind == "flux":  # FlowMatch's dynamic-shifting keys stay in the config, where the pipeline reads them
        assert cfg.use_dynamic_shifting and cfg.get("max_image_seq_len") == 4096 and cfg.get("max_shift") == 1.15
    out, ours = run(pipe, kind)
    assert torch.isfinite(out).all()
    assert len(ours) == 4 and ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)  # FME's grid, shift and mu


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_dpm_solver_order_1_equals_flow_match_euler(kind, components):
    pipe = make_pipe(components, kind, fme(kind))
    ref, _ = run(pipe, kind, num_inference_steps=5)
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config, solver_order=1)
    out, _ = run(pipe, kind, num_inference_steps=5)
    # the same step in another algebraic form ((s'/s) x + (1 - s'/s) x0 against x + (s' - s) v): float32 round-off
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_custom_sigmas_and_mu_are_honoured(kind, components):
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.1]
    pipe = make_pipe(components, kind, fme(kind))
    _, theirs = run(pipe, kind, num_inference_steps=len(sigmas), sigmas=sigmas)
    for cls in (DPMSolverPlusPlusScheduler, UniPCScheduler, DEISScheduler, DCSolverScheduler):
        pipe.scheduler = cls.from_config(fme(kind).config)
        _, ours = run(pipe, kind, num_inference_steps=len(sigmas), sigmas=sigmas)
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7), cls.__name__
    expect = np.asarray(sigmas) * 1000
    if kind == "sd3":  # shift 3: the custom sigmas are shifted, not used as given
        expect = 3 * expect / 1000 / (1 + 2 * expect / 1000) * 1000
    else:  # Flux: the exponential time shift by the mu that the pipeline computes for 8 x 8 / 4 = 16 tokens
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)
        expect = math.exp(mu) / (math.exp(mu) + (1000 / expect - 1))  # Flux gives its transformer t / 1000
    assert theirs == pytest.approx(expect.tolist(), abs=1e-3)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("cls, kw", [SCHEDULERS[0], SCHEDULERS[5], SCHEDULERS[6]], ids=["dpm2", "unipc-bh1", "dc"])
def test_img2img(kind, cls, kw, components, init_image):
    pipe = make_pipe(components, kind, fme(kind), img2img=True)
    ref, theirs = run(pipe, kind, image=init_image, strength=0.6, num_inference_steps=5)
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config, solver_order=1)
    euler, _ = run(pipe, kind, image=init_image, strength=0.6, num_inference_steps=5)
    assert (euler - ref).abs().max() <= 1e-6 * ref.abs().max()  # scale_noise at the begin index, then FME's steps exactly
    pipe.scheduler = cls.from_config(fme(kind).config, **kw)
    out, ours = run(pipe, kind, image=init_image, strength=0.6, num_inference_steps=5)
    assert torch.isfinite(out).all() and len(ours) == 3 and ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_save_and_reload(kind, components, tmp_path):
    pipe = make_pipe(components, kind, UniPCScheduler.from_config(fme(kind).config, solver_order=3))
    a, _ = run(pipe, kind)
    pipe.save_pretrained(tmp_path)
    # diffusers cannot save SD3's absent T5 (None): it is passed again
    extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    loaded = DiffusionPipeline.from_pretrained(tmp_path, **extra)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is UniPCScheduler and type(loaded) is type(pipe)
    assert loaded.scheduler.config.spacing == "flow_match" and loaded.scheduler.config.shift == pipe.scheduler.config.shift
    b, _ = run(loaded, kind)
    assert (a - b).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------- the schedule alone
@pytest.mark.parametrize("fme_kw, call", [
    (SD3_FME, dict(num_inference_steps=4)), (SD3_FME, dict(sigmas=[1.0, 0.7, 0.4, 0.1])),
    (FLUX_FME, dict(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.8)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(num_inference_steps=5, mu=1.3)),
    (dict(shift=3.0, use_karras_sigmas=True), dict(num_inference_steps=6)),
    (dict(shift=3.0, use_exponential_sigmas=True), dict(num_inference_steps=6)),
    (dict(shift=3.0, shift_terminal=0.02), dict(num_inference_steps=6))],
    ids=["sd3", "sd3-sigmas", "flux", "linear-shift", "karras", "exponential", "terminal"])
def test_grid_and_euler_equal_flow_match_in_a_plain_loop(fme_kw, call):
    ref = FlowMatchEulerDiscreteScheduler(**fme_kw)
    ours = DPMSolverPlusPlusScheduler.from_config(ref.config, solver_order=1)
    ref.set_timesteps(**call)
    ours.set_timesteps(**call)
    assert torch.allclose(ours.sigmas, ref.sigmas, atol=1e-6) and torch.allclose(ours.timesteps, ref.timesteps, atol=1e-3)
    x = y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t_ref, t_ours in zip(ref.timesteps, ours.timesteps):
        x = ref.step(torch.tanh(x) * 0.7 + 0.01 * t_ref / 1000, t_ref, x).prev_sample
        y = ours.step(torch.tanh(y) * 0.7 + 0.01 * t_ours / 1000, t_ours, y).prev_sample
    assert (x - y).abs().max() < 1e-6


def test_from_config_both_ways():
    ours = UniPCScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=5.0, use_dynamic_shifting=True).config)
    back = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    assert back.config.shift == 5.0 and back.config.use_dynamic_shifting
    # our own flow config, built by hand, names its shift the FlowMatch way too
    mine = DPMSolverPlusPlusScheduler(use_flow_sigmas=True, flow_shift=2.5, prediction_type="flow_prediction")
    assert FlowMatchEulerDiscreteScheduler.from_config(mine.config).config.shift == 2.5
    # a changed flow_shift on reload is not overridden by the stale FlowMatch key
    assert DPMSolverPlusPlusScheduler.from_config(ours.config, flow_shift=2.0).config.shift == 2.0


def test_bf16_timesteps_find_their_step():
    """Flux casts the timestep it gives the transformer to the latents' dtype; a step called with such a cast
    timestep still finds its own step (the nearest, within bfloat16's rounding)."""
    s = DPMSolverPlusPlusScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    s.set_timesteps(8)
    x = torch.randn(1, 4, 4, 4)
    s.step(torch.zeros_like(x), s.timesteps[3].to(torch.bfloat16), x)
    assert s.step_index == 4


def test_scale_noise_follows_flow_match():
    ref, ours = FlowMatchEulerDiscreteScheduler(shift=3.0), UniPCScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    x, z = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    for s in (ref, ours):
        s.set_timesteps(6)
    t = ref.timesteps[2:3].repeat(2)
    assert torch.allclose(ours.scale_noise(x, t, z), ref.scale_noise(x, t, z), atol=1e-6)  # by timestep
    for s in (ref, ours):
        s.set_begin_index(3)
    assert torch.allclose(ours.scale_noise(x, t, z), ref.scale_noise(x, t, z), atol=1e-6)  # by begin index
    with pytest.raises(ValueError, match="VP scheduler .* use add_noise"):
        UniPCScheduler().scale_noise(x, t, z)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_flow_input_is_an_error():
    with pytest.raises(ValueError, match="invert_sigmas=True, which cannot be honoured"):
        UniPCScheduler.from_config(FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config)
    with pytest.raises(ValueError, match="stochastic_sampling=True"):
        DEISScheduler.from_config(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).config)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=r"flow_shift .* positive finite number, got"):
            UniPCScheduler(use_flow_sigmas=True, flow_shift=bad, prediction_type="flow_prediction")
    dyn = DPMSolverPlusPlusScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"mu must be a finite number, got {bad}"):
            dyn.set_timesteps(4, mu=bad)
    with pytest.raises(ValueError, match="needs mu"):
        dyn.set_timesteps(sigmas=[1.0, 0.5])
    sd3 = DPMSolverPlusPlusScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    for bad in ([1.5, 0.5], [0.5, -0.2], [1.0, 0.5, 0.0, -0.1]):
        with pytest.raises(ValueError, match=r"sigmas|flow"):
            sd3.set_timesteps(sigmas=bad)
    with pytest.raises(ValueError, match=r"flow sigmas must lie in \(0, 1\].*1\.5"):
        sd3.set_timesteps(sigmas=[1.5, 0.5])


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("cls, kw", SCHEDULERS, ids=IDS)
def test_torch_compile_of_a_step_loop(cls, kw):
    """Every coefficient reaching a tensor op is a Python float: dynamo traces the step (numpy scalars in
    ``Tensor.add_(alpha=...)`` broke it)."""
    torch._dynamo.reset()
    s = cls.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, **kw)
    plain = cls.from_config(s.config)

    def loop(sch, x, compiled):
        step = torch.compile(lambda o, t, v: sch.step(o, t, v, generator=torch.Generator().manual_seed(0)).prev_sample,
                             backend="eager", fullgraph=False) if compiled else (
            lambda o, t, v: sch.step(o, t, v, generator=torch.Generator().manual_seed(0)).prev_sample)
        sch.set_timesteps(5)
        for t in sch.timesteps:
            x = step(torch.tanh(x) * 0.5, t, x)
        return x

    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(loop(s, x, True), loop(plain, x, False), atol=1e-6)


# ---------------------------------------------------------------------------------------------- the flow path
def test_flow_view_of_a_vp_model_is_the_same_ode():
    """zoo.load(..., parameterization="flow"): the same network on the same probability path.  On matching levels
    (VE sigma = s / (1 - s)) and matching model times, UniPC-3 on the flow view ends where UniPC-3 on the VP model
    ends (DPM-Solver++/UniPC depend on the levels' lambdas only), up to the float32 model timesteps that a flow
    scheduler hands the model (t = 1000 s rounded to float32 moves the VP time by about 1e-7 of itself)."""
    from fastsample import zoo
    from fastsample.schedules import F64

    unet = zoo.load("fmnist-small", dtype=torch.float64)
    flow = zoo.load("fmnist-small", dtype=torch.float64, parameterization="flow")
    ve = np.array([80.0, 20.0, 5.0, 1.5, 0.5, 0.1])
    s = ve / (1 + ve)
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vp = UniPCScheduler(**zoo.SCHEDULER_CONFIG, solver_order=3)
    vp.set_timesteps(sigmas=list(ve) + [0.0], timesteps=vp.vp.t_from_sigma_ve(torch.tensor(ve, dtype=F64)).tolist())
    x = noise.clone()
    for t in vp.timesteps:
        x = vp.step(unet(x, t).sample, t, x).prev_sample
    fl = UniPCScheduler(**zoo.FLOW_CONFIG, solver_order=3)
    fl.set_timesteps(sigmas=list(s) + [0.0], timesteps=list(s * 1000))  # exact levels: no shift (shift 1 anyway)
    y = noise * float(np.sqrt((1 - s[0]) ** 2 + s[0] ** 2))  # the same state in flow coordinates
    for t in fl.timesteps:
        y = fl.step(flow(y, t).sample, t, y).prev_sample
    assert (x - y).abs().max() < 2e-5
    with pytest.raises(ValueError, match="parameterization must be one of"):
        zoo.load("fmnist-small", parameterization="v")
    with pytest.raises(ValueError, match=r"flow timesteps must lie in \(0, 1000\]"):
        flow(noise, torch.tensor(1200.0))


def test_flow_view_below_the_vp_models_smallest_level():
    """FlowMatch's grids call the model at s = 0.001, below the zoo VP schedule's smallest level (VE sigma 0.01): the
    flow view reads eps at the network's least noisy time and forms x0 with the state's own level, so the velocity
    v = (x - x0) / s stays the network's eps - x0 there (the clamped level's sigma, ten times the state's, would add
    9 eps to it: on noised samples of the data that was a velocity of RMS ~20 instead of ~1)."""
    from fastsample import sample, zoo

    unet = zoo.load("fmnist-small", dtype=torch.float64)
    flow = zoo.load("fmnist-small", dtype=torch.float64, parameterization="flow")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the network's own samples: the data it models
        x0, _ = sample(lambda x, t: unet(x, t).sample, torch.randn(8, 1, 32, 32, generator=g, dtype=torch.float64),
                       UniPCScheduler(**zoo.SCHEDULER_CONFIG, solver_order=3), 20, progress=False)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for s in (0.001, 0.005):
        x = (1 - s) * x0 + s * eps
        with torch.no_grad():
            v, e = flow(x, torch.tensor(1000.0 * s)).sample, unet(x / np.sqrt((1 - s) ** 2 + s ** 2),
                                                                 torch.tensor(0.0)).sample
        ve = s / (1 - s)
        alpha = 1 / np.sqrt(1 + ve ** 2)
        x_vp = x / np.sqrt((1 - s) ** 2 + s ** 2)  # e: eps at the network's least noisy time
        assert torch.allclose(v, (x - (x_vp - ve * alpha * e) / alpha) / s, atol=1e-9)
        assert float(v.pow(2).mean().sqrt()) < 3.0
        assert float((x - s * v - x0).abs().max()) < 0.05  # the data prediction x - s v is the clean image


def test_sweep_on_the_flow_view(tmp_path):
    """A sweep task "<model>:flow": our schedulers on FlowMatch's schedule, diffusers' flow schedulers by name, a
    converged UniPC-3 reference on the same grid, and a clear error for a VP row."""
    from fastsample import sweep

    task = sweep.Task("fmnist-small:flow", reference_steps=8, cache_dir=tmp_path)
    assert task.flow and task.weights != sweep.Task("fmnist-small", reference_steps=8, cache_dir=tmp_path).weights
    sch = sweep.build_scheduler(sweep.normalize_spec("unipc3"), task, 5)
    assert sch.config.prediction_type == "flow_prediction" and sch.config.spacing == "flow_match"
    for row in ("unipc3", "diffusers-fm-euler", "diffusers-fm-heun", "diffusers-unipc-flow",
                "diffusers.FlowMatchEulerDiscreteScheduler{\"shift\": 3.0}"):
        r = sweep.run_cell(task, row, 3, 4, seed=1, metric="rmse")
        assert math.isfinite(r["rmse"]) and r["model_calls"] == (5 if row == "diffusers-fm-heun" else 3), row
    floor = sweep.run_cell(task, "floor", 8, 4, seed=1, metric="rmse")
    assert floor["rmse"] < 1e-6  # the reference is that very solve
    with pytest.raises(ValueError, match="diffusers VP scheduler; this task is a flow model"):
        sweep.run_cell(task, "diffusers-unipc", 3, 4, metric="rmse")
    with pytest.raises(ValueError, match="diffusers flow scheduler; this task is VP"):
        sweep.make_named_scheduler("diffusers-fm-euler", "fmnist-small")


def test_learned_schedule_on_a_flow_model():
    """A gradient fit on FlowMatch's grid, from sigma = 1 (lambda = -inf), on an exact flow testbed: its first level
    stays at pure noise, it lowers the error of the starting grid on held-out noise, and it reloads."""
    from fastsample import zoo
    from fastsample.sampling import reference_states
    from fastsample.schedules import RectifiedFlow
    from fastsample.solvers.learned_schedule import learn_schedule
    from fastsample.testbeds import GaussianMixture

    gm = GaussianMixture.random(dim=8, components=3, seed=1, spread=1.0, schedule=RectifiedFlow(t_min=0.0),
                                prediction_type="flow_prediction", time_scale=1000.0)
    g = torch.Generator().manual_seed(1)
    train, test = (torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (32, 100))

    fine = UniPCScheduler(**zoo.FLOW_CONFIG, solver_order=3)
    fine.set_timesteps(40)
    ref = reference_states(gm, test, fine, 8)[-1]  # the converged solve on FlowMatch's grid

    def error(sch, n):
        x, calls = __import__("fastsample").sample(gm, test, sch, n, progress=False)
        return float((x - ref).norm() / ref.norm()), calls

    s = learn_schedule(gm, UniPCScheduler(**zoo.FLOW_CONFIG, solver_order=3), train, 4, method="gradient",
                       gradient_options={"iterations": 60, "scales": True})
    assert s.timesteps[0] == pytest.approx(1000.0) and s.sigmas[0] == pytest.approx(1.0)
    learned, calls = error(s.scheduler(UniPCScheduler(**zoo.FLOW_CONFIG, solver_order=3)), 4)
    plain, _ = error(UniPCScheduler(**zoo.FLOW_CONFIG, solver_order=3), 4)
    assert calls == 4 and learned < 0.7 * plain, (learned, plain)


def test_tstitch_routes_by_flow_time():
    """T-Stitch on the flow views of the zoo pair: the small model serves the calls at flow time s >= 1 - fraction
    (the noisiest 40% of a linear FlowMatch grid), in any of our schedulers on FlowMatch's schedule."""
    from fastsample import sample, zoo
    from fastsample.guidance.tstitch import StitchedModel

    small, large = (zoo.load(n, parameterization="flow") for n in ("fmnist-small", "fmnist-large"))
    stitched = StitchedModel([small, large], [0.4])
    sch = UniPCScheduler(**zoo.FLOW_CONFIG, solver_order=3)
    x, calls = sample(lambda v, t: stitched(v, t).sample, torch.randn(2, 1, 32, 32), sch, 10, progress=False)
    assert calls == 10 and stitched.calls == [4, 6] and torch.isfinite(x).all()
    assert [stitched.route(t) for t in sch.timesteps] == [0] * 4 + [1] * 6
