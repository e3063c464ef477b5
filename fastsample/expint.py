"""Exponential-integrator algebra shared by every multistep solver.

In lambda = log(alpha / sigma) the probability-flow ODE integrates exactly over one step s -> t (h = lambda_t - lambda_s):
    data form:  x_t = (sigma_t / sigma_s) x_s + alpha_t * int_0^h e^{-(h - u)} x0(lambda_s + u) du
    noise form: x_t = (alpha_t / alpha_s) x_s - alpha_t e^{-lambda_s} * int_0^h e^{-u} eps(lambda_s + u) du
A multistep method replaces x0 (or eps) by a polynomial through past predictions; every method here is then
    x_t = c_x x_s + sum_j c_j P_j (+ c_z z)
with scalar float64 coefficients computed once per grid.  This module holds the pieces: phi functions stable
for small h, Lagrange weights integrated against both kernels (exact moments or Gauss-Legendre quadrature),
and the fused linear combination used on the hot path.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_m z^m / (m + k)!  (phi_0 = e^z, phi_{k+1} = (phi_k - 1/k!) / z), stable for small |z|."""
    if z == -math.inf:
        return 0.0
    if abs(z) < 1.0:
        return sum(z ** m / math.factorial(m + k) for m in range(30))
    val = math.exp(z)
    for j in range(k):
        val = (val - 1.0 / math.factorial(j)) / z
    return val


def data_moment(m: int, h: float) -> float:
    """int_0^h e^{-(h-u)} (u/h)^m du = m! h phi_{m+1}(-h)."""
    if not math.isfinite(h):
        if m == 0:
            return 1.0
        raise ValueError("a polynomial data prediction cannot be integrated to lambda = inf (sigma = 0): use order 1")
    return math.factorial(m) * h * phi(m + 1, -h)


def noise_moment(m: int, h: float, scale: float) -> float:
    """int_0^h e^{-u} (u/scale)^m du = m! P(m+1, h) / scale^m (regularised lower incomplete gamma P)."""
    from scipy.special import gammainc

    return math.factorial(m) * float(gammainc(m + 1, h)) / scale ** m


def lagrange_matrix(nodes) -> np.ndarray:
    """C with L_j(v) = sum_m C[m, j] v^m, the Lagrange basis through ``nodes``."""
    v = np.asarray(nodes, dtype=np.float64)
    return np.linalg.inv(np.vander(v, increasing=True))


def exp_lagrange_weights(offsets, h: float, kind: str) -> list[float]:
    """Weights w_j with int_0^h K(u) P(u) du = sum_j w_j P(u_j) for the polynomial P through the points
    u_j = ``offsets`` (lambda_j - lambda_s); K(u) = e^{-(h-u)} (``kind="data"``) or e^{-u} (``"noise"``)."""
    offsets = list(offsets)
    scale = h if math.isfinite(h) else 1.0
    C = lagrange_matrix([u / scale for u in offsets])
    if kind == "data":
        mom = [data_moment(m, h) for m in range(len(offsets))]
    elif kind == "noise":
        mom = [noise_moment(m, h, scale) for m in range(len(offsets))]
    else:
        raise ValueError(f"kind must be 'data' or 'noise', got {kind!r}")
    return (C.T @ np.asarray(mom)).tolist()


def quadrature_lagrange_weights(nodes, lam_s: float, h: float, t_of_lambda, kind: str, points: int = 64) -> list[float]:
    """As ``exp_lagrange_weights`` but with the polynomial in another variable t (t_j = ``nodes``), t = t(lambda):
    int_0^h K(u) L_j(t(lambda_s + u)) du by Gauss-Legendre in v = e^{-(h-u)} (data) or v = 1 - e^{-u} (noise),
    where the kernel becomes dv, so the integrand is smooth even for h = inf."""
    x, w = np.polynomial.legendre.leggauss(points)
    if kind == "noise":
        vmax = -math.expm1(-h)
        v = 0.5 * vmax * (x + 1.0)
        u = -np.log1p(-v)
    elif kind == "data":
        vmin = math.exp(-h)
        v = vmin + 0.5 * (1.0 - vmin) * (x + 1.0)
        u = h + np.log(v)
        vmax = 1.0 - vmin
    else:
        raise ValueError(f"kind must be 'data' or 'noise', got {kind!r}")
    t = np.asarray(t_of_lambda(torch.as_tensor(lam_s + u, dtype=torch.float64)), dtype=np.float64)
    nodes = np.asarray(nodes, dtype=np.float64)
    center, width = nodes[0], (np.ptp(nodes) or 1.0)
    C = lagrange_matrix((nodes - center) / width)
    basis = np.vander((t - center) / width, len(nodes), increasing=True) @ C  # [points, j]
    return (0.5 * vmax * (w @ basis)).tolist()


def combine(cx: float, x: torch.Tensor, coefs, terms, noise_coef: float = 0.0, noise=None) -> torch.Tensor:
    """cx * x + sum_j coefs[j] * terms[j] + noise_coef * noise, in as few passes as torch allows."""
    out = x * cx
    for c, term in zip(coefs, terms):
        if c != 0.0:
            out.add_(term, alpha=c)
    if noise_coef != 0.0:
        if noise is None:
            raise ValueError("this step needs noise: pass a generator, variance_noise or a noise sampler")
        out.add_(noise, alpha=noise_coef)
    return out
