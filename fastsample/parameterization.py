"""Model outputs <-> (x0, eps): the one place where prediction types are converted.

With x = alpha x0 + sigma eps every supported output is linear in (x, output), so each conversion is two
scalar coefficients per noise level, computed in float64 and applied in one fused multiply-add:
    epsilon:          out = eps
    sample:           out = x0
    v_prediction:     out = alpha eps - sigma x0
    flow_prediction:  out = eps - x0          (the velocity dx/dt of alpha = 1 - t, sigma = t)
"""
from __future__ import annotations

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
