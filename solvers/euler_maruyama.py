"""Euler-Maruyama for the reverse-time SDE, in the VE view y = x / alpha, s = sigma / alpha.

There the forward process is dy = sqrt(d s^2 / dt) dW and the reverse SDE reads dy = -d(s^2) grad log p(y) + noise;
one Euler-Maruyama step from s to s' < s with the score frozen at y, grad log p = (x0 - y) / s^2, is
    y' = (s'^2 / s^2) y + (1 - s'^2 / s^2) x0 + sqrt(s^2 - s'^2) z,
so x' = alpha' y' is a rule of the common form with the data prediction x0.  Its drift equals first-order
SDE-DPM-Solver++'s; the noise differs: EM uses the forward increment s^2 - s'^2, DPM-Solver++ the Gaussian posterior
variance s'^2 (1 - s'^2 / s^2).  The step that ends at sigma = 0 returns x0 (no noise).
"""
from __future__ import annotations

import math

from fastsample.solver import Grid, Rule, Solver


class EulerMaruyama(Solver):
    name = "euler-maruyama"
    prediction = "x0"
    stochastic = True

    def __init__(self):
        super().__init__(1)

    def rule(self, grid: Grid, i: int, k: int) -> Rule:
        a_s, a_t, s_t = grid.alpha[i], grid.alpha[i + 1], grid.sigma[i + 1]
        if s_t == 0:
            return Rule(0.0, (a_t,))
        v_s, v_t = grid.sigma[i] / a_s, s_t / a_t
        r2 = (v_t / v_s) ** 2
        return Rule(a_t / a_s * r2, (a_t * (1.0 - r2),), a_t * math.sqrt(v_s * v_s - v_t * v_t))
