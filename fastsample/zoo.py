"""The shipped Fashion-MNIST models: diffusers UNet2DModels trained by scripts/train.py (VP, diffusers' linear
betas, 1000 steps, epsilon prediction), saved with save_pretrained (safetensors) under fastsample/models/<name>."""
from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
TELEPORT_STATS = MODELS_DIR / "fmnist-gaussian.safetensors"  # the shipped Fashion-MNIST Gaussian statistics


def _unet(channels, layers, attention_last=True, groups=8, num_class_embeds=None):
    n = len(channels)
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D" if attention_last else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attention_last else "UpBlock2D"] + ["UpBlock2D"] * (n - 1)
    cfg = dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=tuple(channels), layers_per_block=layers,
               down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=groups, attention_head_dim=32)
    if num_class_embeds is not None:
        cfg["num_class_embeds"] = num_class_embeds
    return cfg


# name -> (UNet2DModel config, number of classes or None).  The conditional model's label 10 is the null label
# (10% label dropout in training), so classifier-free guidance works.
# The parameters sit at low resolution (4 levels, 32 -> 4 pixels), which keeps CPU training fast.  GroupNorm uses few
# groups: with one channel per group the network cannot see the input's mean, so it cannot predict the noise's mean,
# an error that the data prediction multiplies by sigma/alpha (about 150 at t = 999) and that saturates samples.
MODEL_CONFIGS = {
    # small: few channels at full resolution (where a call's time goes) and no attention, for a call at least 4x
    # cheaper than large's (5.6x at 1 thread, batch 250), so T-Stitch has room to gain.  Two channels there (tried
    # first) cannot denoise pixel by pixel: FID 61 with noise left in the samples
    "fmnist-small": (_unet((4, 8, 16, 32), 1, attention_last=False, groups=2), None),
    "fmnist-large": (_unet((16, 32, 64, 128), 1, groups=4), None),
    "fmnist-cond": (_unet((8, 16, 32, 64), 1, groups=2, num_class_embeds=11), 10),
}
NULL_LABEL = 10
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                        prediction_type="epsilon")
# the flow view of the same models (load(..., parameterization="flow")): FlowMatchEulerDiscreteScheduler's config,
# shift 1 (the path is the models' own; a shift only moves the grid), and the same schedule in our schedulers' keys
# (what OurScheduler.from_config(FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG).config) gives)
FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
FLOW_CONFIG = dict(num_train_timesteps=1000, prediction_type="flow_prediction", spacing="flow_match", flow_shift=1.0,
                   final_sigmas_type="zero")


ZOO_PREFIX = "zoo:"  # an artefact the package ships, by file name: "zoo:fmnist-gaussian.safetensors"


def resolve_artefact(path) -> str:
    """A config's artefact path: "zoo:<file>" is the file of that name in the package's models folder (shipped
    scheduler folders name the shipped statistics so, with no machine path); anything else is returned as it is."""
    path = str(path)
    if path.startswith(ZOO_PREFIX):
        return str(MODELS_DIR / path[len(ZOO_PREFIX):])
    return path


def check_name(name: str) -> str:
    if name not in MODEL_CONFIGS:
        raise ValueError(f"model must be one of {tuple(MODEL_CONFIGS)}, got {name!r}")
    return name


def build(name: str):
    """A freshly initialised UNet2DModel with the named model's architecture."""
    from diffusers import UNet2DModel

    return UNet2DModel(**MODEL_CONFIGS[check_name(name)][0])


def model_fn(name: str, device=None, dtype=None, parameterization: str = "epsilon"):
    """The shipped model ``name`` as a plain function ``f(x, t, **kwargs) -> tensor`` (``fastsample.sampling.model_fn``
    of ``load``); its module is ``f.module``."""
    from .sampling import model_fn as as_function

    return as_function(load(name, device, dtype, parameterization))


def available() -> list[str]:
    return [n for n in MODEL_CONFIGS if (MODELS_DIR / n / "config.json").is_file()]


PARAMETERIZATIONS = ("epsilon", "flow")


def load(name: str, device=None, dtype=None, parameterization: str = "epsilon"):
    """The shipped model ``name`` (EMA weights) as a diffusers UNet2DModel in eval mode.  ``parameterization=
    "flow"``: the same network as a rectified-flow velocity model on the same probability path
    (``fastsample.parameterization.FlowFromVP``), for flow schedulers (FlowMatch configs, ``prediction_type=
    "flow_prediction"``) with timesteps 1000 s."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    import torch
    from diffusers import UNet2DModel

    check_name(name)
    path = MODELS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {name!r} is not shipped yet (no {path}); shipped: {available() or 'none'}. "
                                f"Train it with: python scripts/train.py --model {name}")
    model = UNet2DModel.from_pretrained(path, **({} if dtype is None else {"torch_dtype": dtype}))
    if device is not None:
        model = model.to(device)
    # channels-last convolution weights: about 1.3x the images per second of the default layout on CPU (measured on
    # 2 cores, batch 250); the outputs differ by float32 round-off and keep the caller's layout.  torch's own
    # Module.to: diffusers' override warns about dtype casts on any call, and this one casts nothing
    torch.nn.Module.to(model, memory_format=torch.channels_last)
    model = model.eval().requires_grad_(False)
    if parameterization == "flow":
        from .parameterization import FlowFromVP
        from .schedules import DiscreteVP

        return FlowFromVP(model, DiscreteVP.from_betas_config(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                                                  if k != "prediction_type"})).eval()
    return model
