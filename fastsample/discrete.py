"""Few-step samplers for masked (absorbing) discrete diffusion, and exact measures on the discrete testbed.

A masked-diffusion model gives, for tokens ``x`` (``mask_id`` where masked) at keep level ``alpha`` (the share of
tokens kept; 0: all masked, 1: clean), the posterior marginals ``denoiser(x, alpha) -> N x L x V`` of the clean
tokens.  The analytic-posterior (DDIM-like) step from keep level a to a' > a unmasks each masked token with
probability (a' - a) / (1 - a) and draws its value from the denoiser's marginal; kept tokens stay.  Tokens unmasked
in the same step are drawn independently: that is the few-step sampler's error, and it vanishes as the steps get
finer (one token at a time samples the joint exactly).  ``temperatures`` (one a step; 1: the plain sampler) scale the
marginals' log-probabilities, the per-step coefficient that a distilled sampler learns.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def keep_levels(steps: int, schedule: str = "linear") -> torch.Tensor:
    """steps + 1 keep levels from 0 (all masked) to 1 (clean): linear, or cosine (1 - cos(pi u / 2))."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return u if schedule == "linear" else 1.0 - torch.cos(math.pi * u / 2)


def masked_sample(denoiser, n: int, length: int, vocab_size: int, steps: int, schedule: str = "linear",
                  temperatures=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens in ``steps`` analytic-posterior steps from all-masked; the mask token is
    ``vocab_size``.  ``steps`` denoiser calls."""
    levels = keep_levels(steps, schedule)
    if temperatures is None:
        temperatures = [1.0] * steps
    temperatures = [float(t) for t in temperatures]
    if len(temperatures) != steps or not all(math.isfinite(t) and t > 0 for t in temperatures):
        raise ValueError(f"temperatures must be {steps} finite numbers > 0 (1: the plain sampler), got {temperatures}")
    mask_id = vocab_size
    x = torch.full((n, length), mask_id, dtype=torch.long)
    for i in range(steps):
        a, b = float(levels[i]), float(levels[i + 1])
        probs = denoiser(x, a)
        if probs.shape != (n, length, vocab_size):
            raise ValueError(f"the denoiser must return N x L x V = {(n, length, vocab_size)} probabilities, got "
                             f"{tuple(probs.shape)}: is its vocabulary size {vocab_size}?")
        if temperatures[i] != 1.0:
            probs = torch.softmax(torch.log(probs.clamp_min(1e-300)) / temperatures[i], dim=-1)
        draw = torch.multinomial(probs.reshape(-1, vocab_size), 1, generator=generator).reshape(n, length)
        p_unmask = 1.0 if b >= 1.0 else (b - a) / (1.0 - a)
        unmask = (x == mask_id) & (torch.rand((n, length), generator=generator, dtype=torch.float64) < p_unmask)
        x = torch.where(unmask, draw, x)
    return x


def empirical_kl(testbed, samples: torch.Tensor) -> float:
    """KL(p || q_hat) from the testbed's exact p to the empirical distribution of ``samples`` (every state
    enumerated: V^L must be small), with q_hat smoothed by adding half a count to every state, so unseen states stay
    finite."""
    V, L = testbed.vocab_size, testbed.length
    if V ** L > 2 ** 20:
        raise ValueError(f"empirical_kl enumerates V^L = {V ** L} states; use a testbed with V^L <= 2^20")
    weights = V ** torch.arange(L - 1, -1, -1)
    index = (samples.long() * weights).sum(1)
    counts = torch.bincount(index, minlength=V ** L).double() + 0.5
    q = counts / counts.sum()
    states = torch.stack(torch.meshgrid(*[torch.arange(V)] * L, indexing="ij"), dim=-1).reshape(-1, L)
    logp = testbed.log_prob(states)
    return float((logp.exp() * (logp - torch.log(q))).sum())
