"""``LSDDiscreteScheduler``: a drop-in for diffusers' ``DiscreteDDIMScheduler`` (uniform corruption, e.g. in
``DiffusionGemmaPipeline``) that runs a few-step sampler with LSD/LSD+ coefficients (:mod:`fastsample.discrete`).

Without coefficients it samples exactly the distribution of ``DiscreteDDIMScheduler``: the clean token is drawn
from the logits at the pipeline's ``temperature`` (0: the argmax), then the next token from the analytic posterior
q(x_b | x_a, x0) on the linear keep-level grid.  With fitted coefficients (``coefficients``, the JSON dict of a
:class:`~fastsample.discrete.DiscreteCoefficients`, carried by ``save_pretrained``) step i uses the fitted keep
levels and divides the logits by ``temperature * temperatures[i]``: fitted temperatures act on stochastic sampling
(``temperature > 0``; the pipelines' default 0.0 is greedy and leaves them nothing to do).  The Gibbs corrector
(``corrector_steps``) is DiscreteDDIMScheduler's own, run at the fitted levels.
"""
from __future__ import annotations

import torch
from diffusers import DiscreteDDIMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_discrete_ddim import DiscreteDDIMSchedulerOutput

from fastsample.discrete import DiscreteCoefficients, transition


class LSDDiscreteScheduler(DiscreteDDIMScheduler):
    """DiscreteDDIMScheduler's config keys, plus ``coefficients`` (None: the plain sampler)."""

    @register_to_config
    def __init__(self, num_inference_steps: int = 32, corrector_steps: int = 0, corrector_k: int = 1,
                 corrector_selection: str = "lowest_log_margin", corrector_selection_tau: float = 1.0,
                 coefficients: dict | None = None):
        self._fitted = None
        if coefficients is not None:
            fitted = DiscreteCoefficients.from_dict(coefficients)
            if fitted.corruption != "uniform":
                raise ValueError(f"coefficients are for {fitted.corruption!r} corruption; LSDDiscreteScheduler "
                                 f"samples the uniform kernel (corruption 'uniform')")
            self._fitted = fitted
        self.set_timesteps(self._fitted.steps if self._fitted else num_inference_steps)

    @classmethod
    def from_coefficients(cls, coefficients: DiscreteCoefficients, **config) -> "LSDDiscreteScheduler":
        return cls(num_inference_steps=coefficients.steps, coefficients=coefficients.to_dict(), **config)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or \
                num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if self._fitted is not None and num_inference_steps != self._fitted.steps:
            raise ValueError(f"num_inference_steps={num_inference_steps}, but the coefficients were fitted for "
                             f"{self._fitted.steps} steps; fit them for {num_inference_steps} or drop them")
        coeffs = self._fitted or DiscreteCoefficients.plain(num_inference_steps, "uniform")
        self.levels, self.temperatures = coeffs.levels, coeffs.temperatures
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.arange(num_inference_steps, device=device, dtype=torch.long)

    def _alpha(self, step_index: int) -> float:
        return self.levels[step_index]

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.LongTensor, *,
             temperature: float = 0.0, generator: torch.Generator | None = None, return_dict: bool = True):
        i = int(timestep.item()) if isinstance(timestep, torch.Tensor) else int(timestep)
        if not 0 <= i < self.num_inference_steps:
            raise ValueError(f"timestep must be a step index in [0, {self.num_inference_steps - 1}], got {i}")
        vocab_size = model_output.shape[-1]
        if model_output.shape[:-1] != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}; it must be the sample's shape "
                             f"{tuple(sample.shape)} plus the vocabulary")
        if int(sample.max()) >= vocab_size or int(sample.min()) < 0:
            raise ValueError(f"sample holds token ids in [{int(sample.min())}, {int(sample.max())}], outside the "
                             f"model_output's vocabulary of size {vocab_size}")
        clean, clean_probs = self._sample_from_logits(model_output, temperature=temperature * self.temperatures[i],
                                                      generator=generator)
        hot = torch.nn.functional.one_hot(clean, vocab_size).to(torch.float64)
        nxt = transition(hot, sample, self.levels[i], self.levels[i + 1], "uniform")
        prev = torch.multinomial(nxt.reshape(-1, vocab_size), 1, generator=generator).view_as(sample)
        if not return_dict:
            return prev, clean, clean_probs, model_output
        return DiscreteDDIMSchedulerOutput(prev_sample=prev, sampled_tokens=clean, sampled_probs=clean_probs,
                                           pred_logits=model_output)
