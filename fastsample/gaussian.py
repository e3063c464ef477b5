"""The probability-flow ODE of Gaussian data in closed form, for any schedule written as x = alpha x0 + sigma eps.

For x0 ~ N(mu, U diag(l) U^T + (covariance outside U: 0)) the ODE keeps each eigen-coordinate of x - alpha mu on
its own: it scales by sqrt((sigma^2 + alpha^2 l_k) / (sigma_from^2 + alpha_from^2 l_k)), and the part outside the
span of U (a low-rank U) by sigma / sigma_from, exactly as for l = 0.  VP, VE/EDM (alpha = 1) and rectified flow
(alpha = 1 - t, sigma = t) are all this one formula.
"""
from __future__ import annotations

import torch


def pf_ode_gaussian(x: torch.Tensor, mean: torch.Tensor, evecs: torch.Tensor, evals: torch.Tensor,
                    alpha_from: float, sigma_from: float, alpha_to: float, sigma_to: float) -> torch.Tensor:
    """x at (alpha_to, sigma_to) on the ODE trajectory through ``x`` (B x D) at (alpha_from, sigma_from).
    ``evecs``: D x r orthonormal columns, ``evals``: r eigenvalues (r <= D; r < D drops directions as if l = 0).
    Needs sigma_from > 0.  Computed in the dtype of ``mean`` (float64 recommended)."""
    if sigma_from <= 0:
        raise ValueError(f"sigma_from must be > 0 (the ODE from clean data is not defined), got {sigma_from}")
    dt = mean.dtype
    d = x.to(dt) - alpha_from * mean
    coords = d @ evecs
    scale = ((sigma_to ** 2 + alpha_to ** 2 * evals) / (sigma_from ** 2 + alpha_from ** 2 * evals)).sqrt()
    inside = (coords * scale) @ evecs.T
    outside = (d - coords @ evecs.T) * (sigma_to / sigma_from)
    return alpha_to * mean + inside + outside
