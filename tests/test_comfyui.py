"""The ComfyUI custom nodes (comfyui/fastsample_nodes) against a real ComfyUI checkout: COMFYUI_PATH, or
~/.cache/fastsample/ComfyUI.  Skipped when there is none (ComfyUI is GPL-3.0 and large: it is not a dependency)."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from fastsample import k_diffusion as kd
from fastsample.testbeds import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT = Path(os.environ.get("COMFYUI_PATH", Path.home() / ".cache" / "fastsample" / "ComfyUI"))


@pytest.fixture(scope="module")
def comfy():
    if not (CHECKOUT / "comfy" / "samplers.py").is_file():
        pytest.skip(f"no ComfyUI checkout at {CHECKOUT} (set COMFYUI_PATH)")
    sys.path.insert(0, str(CHECKOUT))
    import comfy.cli_args

    if not torch.cuda.is_available():  # ComfyUI's --cpu: imported as a library it parses no arguments
        comfy.cli_args.args.cpu = True
    import comfy.model_sampling
    import comfy.samplers

    spec = importlib.util.spec_from_file_location("fastsample_nodes", ROOT / "comfyui" / "fastsample_nodes" / "__init__.py")
    nodes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nodes)
    return comfy, nodes


class TinyModel:
    """The shape of the model ComfyUI hands a KSAMPLER: callable as a denoiser, with ``inner_model.model_sampling``
    (ComfyUI's own discrete EPS model sampling)."""

    def __init__(self, comfy, gm):
        class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
            pass

        self.inner_model = type("Inner", (), {"model_sampling": Sampling()})()
        self.gm = gm

    def __call__(self, x, sigma, **kwargs):
        return self.gm.denoise(x.double().reshape(len(x), -1), float(sigma.reshape(-1)[0])).reshape(x.shape).to(x.dtype)


def test_our_sampler_runs_through_comfyuis_ksampler(comfy):
    comfy, nodes = comfy
    gm = GaussianMixture.random(dim=16, components=3, seed=2, spread=1.5)
    model = TinyModel(comfy, gm)
    sampling = model.inner_model.model_sampling
    sig = torch.cat([torch.linspace(float(sampling.sigma_max), 0.05, 8), torch.zeros(1)])
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    (sampler,) = nodes.FastsampleSampler().get_sampler("unipc3")
    assert isinstance(sampler, comfy.samplers.KSAMPLER)
    empty = torch.zeros_like(noise)  # the latent ComfyUI adds the scaled noise to (txt2img: zeros)
    out = sampler.sample(model, sig, {"seed": 0}, None, noise.clone(), empty)
    start = sampling.noise_scaling(sig[0], noise.clone(), empty, sampler.max_denoise(model, sig))
    ref = kd.sample_unipc3(model, start, sig, extra_args={"seed": 0}, disable=True)
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())
    (adaptive,) = nodes.FastsampleAdaptiveSampler().get_sampler("unipc3", 0.01, 0.0016)
    assert torch.isfinite(adaptive.sample(model, sig, {"seed": 0}, None, noise.clone(), empty)).all()
    (learned,) = nodes.FastsampleLearnedSigmas().get_sigmas(str(ROOT / "learned" / "fmnist-large" / "unipc3-nfe5.json"))
    assert learned.shape == (6,) and float(learned[-1]) == 0.0
