"""T-Stitch (arXiv 2402.14167): small models for the early, noisy steps, the large one for the rest.

``StitchedModel(models, fractions)`` routes each call by noise level: with models ordered small to large and
cumulative ``fractions`` f_1 < f_2 < ..., model k serves the calls whose model time satisfies
1 - f_k <= t / T < 1 - f_{k-1} (T = num_train_timesteps; the DiT rule).  So with 10 steps and fraction 0.4 the small
model serves the 4 noisiest steps under any scheduler's spacing, and a teleported or learned schedule is routed by
where its steps are, not by a call counter.  It is an ``nn.Module`` that presents the large model's config, dtype
and device, so diffusers pipelines take it as their ``unet``.
"""
from __future__ import annotations

import torch
from torch import nn


class StitchedModel(nn.Module):
    def __init__(self, models, fractions, num_train_timesteps: int = 1000, restart=None):
        """``restart``: a fastsample scheduler whose multistep history restarts when the serving model changes
        (default None: the history is kept across the switch, as in the official code)."""
        super().__init__()
        models, fractions = list(models), [float(f) for f in fractions]
        if len(models) < 2 or len(fractions) != len(models) - 1:
            raise ValueError(f"need two or more models and one fraction fewer, got {len(models)} models and "
                             f"fractions {fractions}")
        if not all(0 < f < 1 for f in fractions) or any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise ValueError(f"fractions must be strictly increasing and inside (0, 1), got {fractions}")
        shapes = {self._input_shape(m) for m in models} - {None}
        if len(shapes) > 1:
            raise ValueError(f"the models' input shapes differ: {sorted(shapes)}")
        self.modules_ = nn.ModuleList([m for m in models if isinstance(m, nn.Module)])
        self._models, self.fractions, self.num_train_timesteps = models, fractions, num_train_timesteps
        self.restart, self.last_index, self.calls = restart, None, [0] * len(models)

    @staticmethod
    def _input_shape(m):
        cfg = getattr(m, "config", None)
        if cfg is None:
            return None
        size = cfg.get("sample_size") if hasattr(cfg, "get") else getattr(cfg, "sample_size", None)
        chans = cfg.get("in_channels") if hasattr(cfg, "get") else getattr(cfg, "in_channels", None)
        return (chans, tuple(size) if isinstance(size, (list, tuple)) else size)

    # what pipelines read from their unet: the large model's
    @property
    def config(self):
        return self._models[-1].config

    @property
    def dtype(self):
        return getattr(self._models[-1], "dtype", torch.float32)

    @property
    def device(self):
        return getattr(self._models[-1], "device", torch.device("cpu"))

    def route(self, timestep) -> int:
        """The index of the model that serves model time ``timestep`` (a number or a tensor of equal entries)."""
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        tau = t / self.num_train_timesteps
        for k, f in enumerate(self.fractions):
            if tau >= 1 - f - 1e-9:
                return k
        return len(self.fractions)

    def forward(self, sample: torch.Tensor, timestep, *args, **kwargs):
        k = self.route(timestep)
        if self.restart is not None and self.last_index is not None and k != self.last_index:
            self.restart.restart_history()
        self.last_index = k
        self.calls[k] += 1
        return self._models[k](sample, timestep, *args, **kwargs)

