"""fastsample's samplers and learned schedules as ComfyUI nodes (SamplerCustom / SamplerCustomAdvanced).

Install: link or copy this folder into ``ComfyUI/custom_nodes/`` and install fastsample into ComfyUI's Python
(``pip install -e <fastsample checkout>``). ComfyUI is GPL-3.0: this folder imports it and copies nothing.

- "fastsample sampler" (SAMPLER): any registered fastsample solver, in k-diffusion's convention
  (``fastsample.k_diffusion``), wrapped by ComfyUI's own ``comfy.samplers.KSAMPLER``. Flow models (ComfyUI's
  CONST model sampling: SD3, Flux, ...) are detected and solved on the flow's own log-SNR.
- "fastsample adaptive sampler" (SAMPLER): adaptive step size (``sample_dpm_adaptive``), the sigmas' ends only.
- "fastsample learned sigmas" (SIGMAS): the levels of a learned schedule file (``LearnedSchedule`` JSON).
"""
from __future__ import annotations

import comfy.samplers

from fastsample import k_diffusion as kd
from fastsample.registry import all_names

MODEL_TYPES = ("auto", "ve", "const")


def model_type_of(model) -> str:
    """"const" when the k-diffusion-convention model ComfyUI passes wraps a CONST (flow) model sampling."""
    try:
        sampling = model.inner_model.model_patcher.get_model_object("model_sampling")
    except AttributeError:
        sampling = getattr(getattr(model, "inner_model", None), "model_sampling", None)
    try:
        import comfy.model_sampling as ms
    except ImportError:
        return "ve"
    return "const" if isinstance(sampling, ms.CONST) else "ve"


def sampler_function(solver: str, model_type: str = "auto", **options):
    """The k-diffusion-convention function KSAMPLER calls: ``fn(model, x, sigmas, extra_args, callback, disable)``."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        kind = model_type_of(model) if model_type == "auto" else model_type
        return kd.sample(solver, model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                         model_type=kind, **options)

    return sample


def adaptive_function(solver: str, rtol: float, atol: float, model_type: str = "auto"):
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        kind = model_type_of(model) if model_type == "auto" else model_type
        positive = [float(s) for s in sigmas if float(s) > 0]
        return kd.sample_dpm_adaptive(model, x, min(positive), max(positive), extra_args=extra_args,
                                      callback=callback, disable=disable, rtol=rtol, atol=atol, solver=solver,
                                      model_type=kind)

    return sample


class FastsampleSampler:
    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"solver": (sorted(all_names()), {"default": "unipc3"}),
                             "model_type": (MODEL_TYPES, {"default": "auto"})},
                "optional": {"eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                             "s_noise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})}}

    def get_sampler(self, solver, model_type="auto", eta=1.0, s_noise=1.0):
        options = {"s_noise": s_noise}
        if solver.startswith("sde-"):
            options["eta"] = eta
        return (comfy.samplers.KSAMPLER(sampler_function(solver, model_type, **options)),)


class FastsampleAdaptiveSampler:
    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"solver": (("unipc3", "dpm++3m", "unipc2", "dpm++2m"), {"default": "unipc3"}),
                             "rtol": ("FLOAT", {"default": 0.01, "min": 1e-5, "max": 1.0, "step": 0.001}),
                             "atol": ("FLOAT", {"default": 0.0016, "min": 0.0, "max": 1.0, "step": 0.0001}),
                             "model_type": (MODEL_TYPES, {"default": "auto"})}}

    def get_sampler(self, solver, rtol, atol, model_type="auto"):
        return (comfy.samplers.KSAMPLER(adaptive_function(solver, rtol, atol, model_type)),)


class FastsampleLearnedSigmas:
    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"schedule": ("STRING", {"default": "learned/fmnist-large/unipc3-nfe5.json"})}}

    def get_sigmas(self, schedule):
        from fastsample.solvers.learned_schedule import LearnedSchedule

        return (kd.learned_sigmas(LearnedSchedule.load(schedule)).float(),)


NODE_CLASS_MAPPINGS = {"FastsampleSampler": FastsampleSampler, "FastsampleAdaptiveSampler": FastsampleAdaptiveSampler,
                       "FastsampleLearnedSigmas": FastsampleLearnedSigmas}
NODE_DISPLAY_NAME_MAPPINGS = {"FastsampleSampler": "fastsample sampler",
                              "FastsampleAdaptiveSampler": "fastsample adaptive sampler",
                              "FastsampleLearnedSigmas": "fastsample learned sigmas"}
