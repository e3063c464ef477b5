"""Model outputs <-> (x0, eps): the one place where prediction types are converted.

With x = alpha x0 + sigma eps every supported output is linear in (x, output), so each conversion is two
scalar coefficients per noise level, computed in float64 and applied in one fused multiply-add:
    epsilon:          out = eps
    sample:           out = x0
    v_prediction:     out = alpha eps - sigma x0
    flow_prediction:  out = eps - x0          (the velocity dx/dt of alpha = 1 - t, sigma = t)
"""
from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def x0_coefficients(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(cx, co) with x0 = cx * x + co * out."""
    a, s = float(alpha), float(sigma)
    if prediction_type == "epsilon":
        return 1.0 / a, -s / a
    if prediction_type == "sample":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        n = a * a + s * s
        return a / n, -s / n
    if prediction_type == "flow_prediction":
        n = a + s
        return 1.0 / n, -s / n
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def eps_coefficients(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(cx, co) with eps = cx * x + co * out."""
    a, s = float(alpha), float(sigma)
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "sample":
        return 1.0 / s, -a / s
    if prediction_type == "v_prediction":
        n = a * a + s * s
        return s / n, a / n
    if prediction_type == "flow_prediction":
        n = a + s
        return 1.0 / n, a / n
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def output_from(prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The model output of a given type for known (x0, eps): what an exact model returns."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "flow_prediction":
        return eps - x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _affine(cx: float, co: float, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if cx == 0.0:
        return out * co if co != 1.0 else out
    return torch.mul(out, co).add_(x, alpha=cx)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding, per sample: s = clamp(quantile(|x0|, ratio), 1, max_value)."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def convert(out: torch.Tensor, x: torch.Tensor, prediction_type: str, alpha: float, sigma: float,
            want: str = "x0", threshold=None) -> torch.Tensor:
    """Convert a model output to the data prediction (``want="x0"``) or the noise prediction (``"eps"``).

    ``threshold`` is an optional callable applied to x0 (for ``want="eps"`` eps is re-derived from it).
    """
    if want == "x0" or threshold is not None:
        x0 = _affine(*x0_coefficients(prediction_type, alpha, sigma), x, out)
        if threshold is not None:
            x0 = threshold(x0)
        if want == "x0":
            return x0
        return (x - alpha * x0) / sigma
    if want == "eps":
        return _affine(*eps_coefficients(prediction_type, alpha, sigma), x, out)
    raise ValueError(f"want must be 'x0' or 'eps', got {want!r}")


class FlowFromVP(torch.nn.Module):
    """A VP epsilon-prediction network as a rectified-flow velocity model on the same probability path, exactly.

    The flow state x_f = (1 - s) x0 + s eps at flow time s (the model's timestep is 1000 s, as FlowMatch pipelines
    give it) has the VE noise level sigma_ve = s / (1 - s); the VP state at that level is x_vp = x_f / sqrt((1 - s)^2
    + s^2) (alpha x0 + sigma eps with alpha = 1 / sqrt(1 + sigma_ve^2)), at the VP time t = schedule.t_from_sigma_ve(
    sigma_ve).  From the network's eps at (x_vp, t) the data prediction is x0 = (x_vp - sigma eps) / alpha, and the
    velocity v = eps_f - x0 = (x_f - x0) / s.  Above the VP schedule's largest level (s > sigma_max / (1 + sigma_max),
    0.99367 for the zoo's 1000 linear betas; FlowMatch grids start at s = 1) the network is evaluated at its noisiest
    timestep on the same normalised input: there it predicts x0 from almost pure noise, which is the one value a
    network trained up to that level gives.  Below its smallest level (VE sigma 0.01 for the zoo's betas; FlowMatch
    grids end at s = 0.001) the network is evaluated at its least noisy timestep and x0 is formed with the state's own
    alpha and sigma.  Call it as a diffusers model: ``model(x, timestep).sample``."""

    # the conversion's revision (model_hash mixes it in): 2 forms x0 with the state's own level below the VP's
    # smallest one; fits and measurements made with revision 1 do not match the weights' hash any more
    hash_salt = "flow-from-vp/2"

    def __init__(self, unet, schedule, num_train_timesteps: int = 1000):
        super().__init__()
        self.unet, self.schedule, self.num_train_timesteps = unet, schedule, num_train_timesteps
        self.config = unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def forward(self, sample: torch.Tensor, timestep, *args, return_dict: bool = True, **kwargs):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        from .schedules import F64

        t = torch.as_tensor(timestep, dtype=F64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(sample.shape[0])
        s = (t / self.num_train_timesteps).cpu()
        if not bool(((s > 0) & (s <= 1)).all()):
            raise ValueError(f"flow timesteps must lie in (0, {self.num_train_timesteps}], got {t.tolist()}")
        vp = self.schedule
        s_max = float(vp.sigma_ve(torch.tensor(vp.t_max, dtype=F64)))
        ve = torch.where(s < 1, s / (1 - s).clamp_min(1e-300), torch.full_like(s, math.inf)).clamp(max=s_max)
        t_vp = vp.t_from_sigma_ve(ve)
        # the state's own level converts eps to x0; only above the largest trained level (where alpha -> 0) is it
        # the clamped one.  Below the smallest trained level (the zoo's VP: sigma 0.01, flow s ~ 0.0099; FlowMatch's
        # grids call the model at s = 0.001) the network's eps is read at its least noisy time, but x0 comes from
        # the state's level: the clamped level's sigma would put a 10x too large share of eps into x0 there
        alpha = 1 / torch.sqrt(1 + ve ** 2)
        sigma = ve * alpha
        norm = torch.sqrt((1 - s) ** 2 + s ** 2)
        shape = (-1,) + (1,) * (sample.ndim - 1)
        dev, dt = sample.device, sample.dtype
        col = lambda v: v.to(device=dev, dtype=torch.float32 if dt != torch.float64 else dt).reshape(shape)  # noqa: E731
        x = sample.to(col(s).dtype)
        x_vp = x / col(norm)
        eps = self.unet(x_vp.to(dt), t_vp.to(device=dev, dtype=torch.float32), *args, **kwargs).sample.to(x.dtype)
        x0 = (x_vp - col(sigma) * eps) / col(alpha)
        v = ((x - x0) / col(s)).to(dt)
        return UNet2DOutput(sample=v) if return_dict else (v,)
