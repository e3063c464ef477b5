"""Noise for SDE steps: fresh Gaussian draws, or a Brownian tree that keeps a seed's path across step counts.

An SDE step s -> t of the exponential integrators needs z ~ N(0, I) with sigma_t sqrt(1 - e^{-2 eta h}) z the
exact Ito integral of the noise.  Writing that integral as a Brownian motion B in the time tau = e^{2 eta lambda}
gives z = (B(tau_t) - B(tau_s)) / sqrt(tau_t - tau_s); sampling B from one tree per seed makes every step count
see the same path.  The tree bisects in u = log tau and draws each node from its Brownian bridge in tau.
"""
from __future__ import annotations

import math

import torch

NOISE_TYPES = ("gaussian", "brownian_tree")


class BrownianTree:
    """B(tau) for tau = e^u on [e^u0, e^u1], B(e^u0) = 0, resolved to ``tol`` in u, one tree per seed."""

    def __init__(self, u0: float, u1: float, shape, seeds, tol: float = 1e-3):
        if not (math.isfinite(u0) and math.isfinite(u1) and u0 < u1):
            raise ValueError(f"BrownianTree needs finite u0 < u1, got {u0}, {u1}")
        self.u0, self.u1, self.tol = u0, u1, tol
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(shape)
        if len(self.seeds) > 1 and self.shape[0] != len(self.seeds):
            raise ValueError(f"one seed per sample: got {len(self.seeds)} seeds for batch {self.shape[0]}")
        self.w1 = self._normal(0, 0) * math.sqrt(math.exp(u1) - math.exp(u0))
        self._cache: dict = {}

    def _normal(self, depth: int, index: int) -> torch.Tensor:
        parts = []
        sub = self.shape[1:] if len(self.seeds) > 1 else self.shape
        for s in self.seeds:
            g = torch.Generator().manual_seed(hash((s, depth, index)) % (2 ** 63))
            parts.append(torch.randn(sub, generator=g, dtype=torch.float64))
        return torch.stack(parts) if len(self.seeds) > 1 else parts[0]

    def value(self, u: float) -> torch.Tensor:
        u = min(max(u, self.u0), self.u1)
        if u in self._cache:
            return self._cache[u]
        a, b = self.u0, self.u1
        wa, wb = torch.zeros_like(self.w1), self.w1
        depth, index = 0, 0
        while b - a > self.tol:
            m = 0.5 * (a + b)
            ta, tm, tb = math.exp(a), math.exp(m), math.exp(b)
            std = math.sqrt((tm - ta) * (tb - tm) / (tb - ta))
            depth, index = depth + 1, 2 * index
            wm = wa + (tm - ta) / (tb - ta) * (wb - wa) + std * self._normal(depth, index)
            if u < m:
                b, wb = m, wm
            else:
                a, wa, index = m, wm, index + 1
        ta, tu, tb = math.exp(a), math.exp(u), math.exp(b)
        w = wa + (tu - ta) / (tb - ta) * (wb - wa)
        if len(self._cache) > 4:
            self._cache.clear()
        self._cache[u] = w
        return w

    def increment(self, ua: float, ub: float) -> torch.Tensor:
        """Standardised increment (B(e^ub) - B(e^ua)) / sqrt(e^ub - e^ua)."""
        lo, hi = min(ua, ub), max(ua, ub)
        return (self.value(hi) - self.value(lo)) / math.sqrt(math.exp(hi) - math.exp(lo))


def seeds_from(generator, batch: int, per_sample: bool) -> list[int]:
    """Tree seeds drawn from a torch.Generator (or a list of them, one per sample)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        return [int(torch.randint(0, 2 ** 62, (1,), generator=g).item()) for g in generator]
    if generator is None:
        return [int(torch.randint(0, 2 ** 62, (1,)).item())]
    return [int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())]
