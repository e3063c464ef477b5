"""Classifier-free guidance as a model wrapper: any diffusers-style conditional model becomes ``model(x, t)``."""
from __future__ import annotations

import torch

from fastsample.sampling import model_output


def _check_scale(scale) -> float:
    if not torch.isfinite(torch.tensor(float(scale))):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def guided(call, x: torch.Tensor, scale: float, cond: dict, uncond: dict | None) -> torch.Tensor:
    """``out_u + scale (out_c - out_u)`` from one batched ``call(cat([x, x]), **kwargs)`` whose keyword tensors are
    ``cat([uncond[k], cond[k]])`` (the unconditional half first, as diffusers' pipelines order it); with ``uncond``
    None, the one call ``call(x, **cond)``."""
    if uncond is None:
        return model_output(call(x, **cond))
    both = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
    out_u, out_c = model_output(call(torch.cat([x, x]), **both)).chunk(2)
    return out_u + scale * (out_c - out_u)


class ClassifierFreeGuidance:
    """``out_u + scale (out_c - out_u)`` from one batched call of ``unet(x, t, class_labels=...)``, the unconditional
    half with ``null_label``.  ``scale`` 1 is the conditional model, 0 the unconditional one.  Works for any
    prediction type that is linear in the score (epsilon, v, x0, flow)."""

    def __init__(self, unet, labels: torch.Tensor, scale: float, null_label: int):
        self.unet, self.labels, self.scale, self.null_label = unet, torch.as_tensor(labels), _check_scale(scale), null_label

    def __call__(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``class_labels``, when given, replaces the labels fixed at construction (so a caller can slice them)."""
        labels = self.labels if class_labels is None else torch.as_tensor(class_labels)
        if len(labels) != len(x):
            raise ValueError(f"labels has {len(labels)} entries for a batch of {len(x)}")
        labels = labels.to(x.device)
        null = None if self.scale == 1.0 else {"class_labels": torch.full_like(labels, self.null_label)}
        return guided(lambda z, **kw: self.unet(z, t, **kw, **kwargs), x, self.scale, {"class_labels": labels}, null)


class PromptGuidance:
    """A text-conditioned UNet with classifier-free guidance as ``model(x, t)``, computed as Stable Diffusion's
    pipelines compute it: one call on ``cat([x, x])`` with ``cat([negative, prompt])`` embeddings, then
    ``uncond + scale (cond - uncond)`` (``scale`` <= 1: one call on the prompt alone).  The same numbers as the
    pipeline's, so an inversion made through it regenerates exactly in the pipeline."""

    def __init__(self, unet, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None,
                 scale: float = 1.0):
        scale = _check_scale(scale)
        if scale > 1.0 and negative_prompt_embeds is None:
            raise ValueError(f"scale={scale} > 1 needs negative_prompt_embeds (the unconditional embeddings)")
        self.unet, self.scale, self.cond, self.uncond = unet, scale, prompt_embeds, negative_prompt_embeds

    @classmethod
    def from_pipeline(cls, pipe, prompt: str, guidance_scale: float = 1.0, negative_prompt: str | None = None):
        """The guided UNet of a Stable Diffusion pipeline ``pipe`` for ``prompt``, with its own text encoder."""
        cond, uncond = pipe.encode_prompt(prompt, pipe.unet.device, 1, guidance_scale > 1.0, negative_prompt)
        return cls(pipe.unet, cond, uncond, guidance_scale)

    def _batch(self, embeds: torch.Tensor, n: int) -> torch.Tensor:  # one prompt for a batch, as the pipeline repeats it
        if len(embeds) == n:
            return embeds
        if len(embeds) != 1:
            raise ValueError(f"{len(embeds)} prompt embeddings for a batch of {n}: give one, or one per sample")
        return embeds.expand(n, *embeds.shape[1:])

    def __call__(self, x: torch.Tensor, t, **kwargs) -> torch.Tensor:
        n = len(x)
        uncond = None if self.scale <= 1.0 else {"encoder_hidden_states": self._batch(self.uncond, n)}
        return guided(lambda z, **kw: self.unet(z, t, **kw, return_dict=False), x, self.scale,
                      {"encoder_hidden_states": self._batch(self.cond, n)}, uncond)
