"""Classifier-free guidance as a model wrapper: any diffusers-style conditional model becomes ``model(x, t)``."""
from __future__ import annotations

import torch

from fastsample.sampling import model_output


class ClassifierFreeGuidance:
    """``out_u + scale (out_c - out_u)`` from one batched call of ``unet(x, t, class_labels=...)``, the unconditional
    half with ``null_label``.  ``scale`` 1 is the conditional model, 0 the unconditional one.  Works for any
    prediction type that is linear in the score (epsilon, v, x0, flow)."""

    def __init__(self, unet, labels: torch.Tensor, scale: float, null_label: int):
        if not torch.isfinite(torch.tensor(float(scale))):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        self.unet, self.labels, self.scale, self.null_label = unet, torch.as_tensor(labels), float(scale), null_label

    def __call__(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``class_labels``, when given, replaces the labels fixed at construction (so a caller can slice them)."""
        labels = self.labels if class_labels is None else torch.as_tensor(class_labels)
        if len(labels) != len(x):
            raise ValueError(f"labels has {len(labels)} entries for a batch of {len(x)}")
        labels = labels.to(x.device)
        if self.scale == 1.0:
            return model_output(self.unet(x, t, class_labels=labels, **kwargs))
        null = torch.full_like(labels, self.null_label)
        both = model_output(self.unet(torch.cat([x, x]), t, class_labels=torch.cat([null, labels]), **kwargs))
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)
