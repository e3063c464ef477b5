"""Analytic Gaussian teleportation (arXiv 2311.10892): the first part of the trajectory in closed form.

At high noise a trained model's denoiser is close to that of a Gaussian with the data's mean and covariance, whose
probability-flow ODE has a closed form (``fastsample.gaussian.pf_ode_gaussian``).  ``GaussianStats`` holds the mean
and the (optionally top-r) eigendecomposition of the covariance; ``teleport`` moves noise to a later noise level with
no model call.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastsample.gaussian import pf_ode_gaussian

F64 = torch.float64


@dataclass
class GaussianStats:
    mean: torch.Tensor    # D, float64
    evecs: torch.Tensor   # D x r, orthonormal columns
    evals: torch.Tensor   # r, descending, >= 0
    shape: tuple          # the shape of one sample
    count: int = 0        # samples the statistics were computed from

    def __post_init__(self):
        if not self.shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in self.shape):
            raise ValueError(f"the sample shape must be positive integers, got {self.shape!r}")
        d = math.prod(self.shape)
        if self.mean.shape != (d,) or self.evecs.shape[0] != d or self.evecs.shape[1] != self.evals.shape[0]:
            raise ValueError(f"inconsistent statistics: mean {tuple(self.mean.shape)}, evecs {tuple(self.evecs.shape)}, "
                             f"evals {tuple(self.evals.shape)} for samples of shape {self.shape}")
        for name in ("mean", "evecs", "evals"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"the statistics' {name} contains NaN or Inf")
        if self.rank and float(self.evals.min()) < 0:  # a variance; negative ones gave NaN latents
            raise ValueError(f"the statistics' evals (variances) must be >= 0, got a minimum of {float(self.evals.min()):.4g}")
        gram = self.evecs.T.to(F64) @ self.evecs.to(F64)
        if self.rank and float((gram - torch.eye(self.rank, dtype=F64)).abs().max()) > 1e-4:
            raise ValueError("the statistics' evecs must have orthonormal columns (max |E^T E - I| "
                             f"{float((gram - torch.eye(self.rank, dtype=F64)).abs().max()):.3g} > 1e-4)")

    @property
    def rank(self) -> int:
        return self.evals.shape[0]

    @classmethod
    def from_moments(cls, n: int, total: torch.Tensor, outer: torch.Tensor, shape, rank: int | None = None):
        if n < 2:
            raise ValueError(f"need at least 2 samples, got {n}")
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.T))
        if float(evals.min()) < -1e-9 * max(float(evals.max()), 1e-300) * len(evals):
            raise ValueError(f"the covariance is not positive semi-definite (eigenvalue {float(evals.min()):.4g}): "
                             f"the moments are not those of one set of samples")
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)  # only round-off below 0 is set to 0
        if rank is not None:
            if not 1 <= rank <= len(evals):
                raise ValueError(f"rank must be in [1, {len(evals)}], got {rank}")
            evals, evecs = evals[:rank], evecs[:, :rank]
        return cls(mean, evecs.contiguous(), evals.contiguous(), tuple(shape), n)

    @classmethod
    def from_samples(cls, x: torch.Tensor, rank: int | None = None) -> "GaussianStats":
        """From an N x ... tensor of data samples (flattened per sample)."""
        flat = x.reshape(len(x), -1).to(F64)
        return cls.from_moments(len(flat), flat.sum(0), flat.T @ flat, x.shape[1:], rank)

    @classmethod
    def from_dataset(cls, batches, rank: int | None = None) -> "GaussianStats":
        """Streaming over an iterable of batches (tensors, or tuples whose first item is the tensor, as a DataLoader
        yields): only the running sum and sum of outer products (D x D) are held."""
        n, total, outer, shape = 0, None, None, None
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            flat = x.reshape(len(x), -1).to(F64)
            if total is None:
                shape, total, outer = tuple(x.shape[1:]), flat.sum(0), flat.T @ flat
            else:
                if tuple(x.shape[1:]) != shape:
                    raise ValueError(f"batches must share one sample shape: {shape} then {tuple(x.shape[1:])}")
                total, outer = total + flat.sum(0), outer + flat.T @ flat
            n += len(flat)
        if total is None:
            raise ValueError("from_dataset got no batches")
        return cls.from_moments(n, total, outer, shape, rank)

    def save(self, path):
        save_file({"mean": self.mean.contiguous(), "evecs": self.evecs.contiguous(), "evals": self.evals.contiguous()},
                  str(path), metadata={"shape": json.dumps(list(self.shape)), "count": str(self.count)})

    @classmethod
    def load(cls, path) -> "GaussianStats":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta, names = f.metadata() or {}, set(f.keys())
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors' own error types
            raise ValueError(f"{path} is not a safetensors file ({e})") from None
        missing = {"mean", "evecs", "evals"} - names
        if "shape" not in meta or missing:
            raise ValueError(f"{path} is not a GaussianStats file: it needs the tensors mean, evecs and evals and a "
                             f"sample shape in its metadata; missing {sorted(missing) + ([] if 'shape' in meta else ['shape'])}")
        try:
            shape, count = tuple(json.loads(meta["shape"])), int(meta.get("count", 0))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad metadata (shape {meta.get('shape')!r}, count {meta.get('count')!r}): {e}") from None
        t = load_file(str(path))
        try:
            return cls(t["mean"].to(F64), t["evecs"].to(F64), t["evals"].to(F64), shape, count)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def teleport(self, noise: torch.Tensor, alpha_from: float, sigma_from: float, alpha_to: float,
                 sigma_to: float) -> torch.Tensor:
        """The Gaussian probability-flow ODE from ``noise`` (B x shape, at alpha_from, sigma_from) to (alpha_to,
        sigma_to), in float64, returned in the noise's dtype and device."""
        if tuple(noise.shape[1:]) != self.shape:
            raise ValueError(f"the statistics are for samples of shape {self.shape}, got {tuple(noise.shape[1:])}")
        flat = noise.reshape(len(noise), -1).detach().cpu().to(F64)
        out = pf_ode_gaussian(flat, self.mean, self.evecs, self.evals, alpha_from, sigma_from, alpha_to, sigma_to)
        return out.reshape(noise.shape).to(device=noise.device, dtype=noise.dtype)

    def denoise(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """E[x0 | x] for x = alpha x0 + sigma eps under this Gaussian (outside a low-rank basis: the mean)."""
        flat = x.reshape(len(x), -1).detach().cpu().to(F64) - alpha * self.mean
        coords = flat @ self.evecs
        x0 = self.mean + (coords * (alpha * self.evals / (alpha ** 2 * self.evals + sigma ** 2))) @ self.evecs.T
        return x0.reshape(x.shape).to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def choose_teleport_fraction(model, scheduler, stats: GaussianStats, num_inference_steps: int, probes: torch.Tensor,
                             tol: float = 0.005, **model_kwargs) -> tuple[float, list[float]]:
    """The largest share of the ``num_inference_steps`` steps whose end point can be reached by teleporting: at each
    node k of the scheduler's grid (without teleportation), the probes' noise is teleported there and the model's
    noise prediction (the ODE's velocity) compared with the Gaussian's, ||eps_model - eps_gauss|| / ||eps_gauss||
    (in x0 space the model's own error at high noise would dominate, amplified by sigma/alpha); the fraction is k/N
    for the largest k whose nodes 0..k all stay within ``tol``.  Returns (fraction, the error at each node).
    The default 0.005 is calibrated on fmnist-large's fitting noise (``experiments/teleport_tolerance.py``): where
    the model and the Gaussian agree to about the model's own floor (0.0025); 0.05 teleported to t ~ 600 and lost to
    plain UniPC-3 from 5 model calls on."""
    from fastsample.parameterization import convert
    from fastsample.sampling import model_output

    if not 0 < tol:
        raise ValueError(f"tol must be > 0, got {tol}")
    base = type(scheduler).from_config({**scheduler.config, "teleport_fraction": 0.0, "teleport_sigma": None,
                                        "teleport_stats": None})
    base.set_timesteps(num_inference_steps)
    grid, errors, fraction = base.grid, [], 0.0
    x_T = probes * base.init_noise_sigma
    for k in range(grid.num_steps):
        a, s = grid.alpha[k], grid.sigma[k]
        x = stats.teleport(x_T, grid.alpha[0], grid.sigma[0], a, s) if k else x_T
        out = model_output(model(x, base.timesteps[k], **model_kwargs))
        eps_model = convert(out.to(F64), x.to(F64), base.config.prediction_type, a, s, "eps")
        eps_gauss = (x.to(F64) - a * stats.denoise(x, a, s).to(F64)) / s
        errors.append(float((eps_model - eps_gauss).norm() / eps_gauss.norm()))
        if all(e <= tol for e in errors):
            fraction = k / grid.num_steps
    return fraction, errors
