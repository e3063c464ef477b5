"""LSDDiscreteScheduler (issue 23): diffusers' DiscreteDDIMScheduler's distribution without coefficients, the
fitted levels and temperatures with them, in DiffusionGemmaPipeline with one model call a step, carried by
save_pretrained, and bad input named."""
import math

import pytest
import torch
from diffusers import DiscreteDDIMScheduler

from fastsample.discrete import DiscreteCoefficients
from fastsample.solvers import LSDDiscreteScheduler


def _frequencies(scheduler, logits, sample, step, temperature, draws=4000, seed=0):
    """Per-position frequencies of the next token over ``draws`` repeated steps."""
    g = torch.Generator().manual_seed(seed)
    B, L, V = logits.shape
    rep = lambda t: t.repeat(draws, *([1] * (t.ndim - 1)))  # noqa: E731
    out = scheduler.step(rep(logits), step, rep(sample), temperature=temperature, generator=g).prev_sample
    hot = torch.nn.functional.one_hot(out.view(draws, B, L), V).double()
    return hot.mean(0)


@pytest.mark.parametrize("temperature", [1.0, 0.0, 0.7])
@pytest.mark.parametrize("step", [0, 2, 3])
def test_without_coefficients_it_samples_discrete_ddim(temperature, step):
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(3, 5, 6, generator=g)
    sample = torch.randint(0, 6, (3, 5), generator=g)
    ours, theirs = LSDDiscreteScheduler(), DiscreteDDIMScheduler()
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    f_ours = _frequencies(ours, logits, sample, step, temperature)
    f_theirs = _frequencies(theirs, logits, sample, step, temperature, seed=1)
    # two independent 4000-draw estimates of the same probabilities: 5 standard errors
    se = ((f_theirs * (1 - f_theirs)).clamp_min(1e-4) * 2 / 4000).sqrt()
    assert ((f_ours - f_theirs).abs() <= 5 * se + 1e-3).all(), (f_ours - f_theirs).abs().max()


def test_identity_coefficients_are_the_plain_scheduler_and_fitted_ones_change_it():
    g = torch.Generator().manual_seed(2)
    logits, sample = torch.randn(4, 8, 5, generator=g), torch.randint(0, 5, (4, 8), generator=g)
    plain = LSDDiscreteScheduler(num_inference_steps=4)
    same = LSDDiscreteScheduler.from_coefficients(DiscreteCoefficients.plain(4, "uniform"))
    fitted = LSDDiscreteScheduler.from_coefficients(
        DiscreteCoefficients((0.0, 0.1, 0.4, 0.8, 1.0), (1.0, 0.5, 0.5, 1.0), "uniform"))
    outs = [s.step(logits, 1, sample, temperature=1.0, generator=torch.Generator().manual_seed(5)).prev_sample
            for s in (plain, same, fitted)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert fitted._alpha(2) == 0.4 and plain._alpha(2) == 0.5


def test_save_pretrained_round_trip(tmp_path):
    c = DiscreteCoefficients((0.0, 0.2, 0.7, 1.0), (2.0, 0.6, 0.9), "uniform", {"method": "LSD+"})
    s = LSDDiscreteScheduler.from_coefficients(c, corrector_steps=1)
    s.save_pretrained(tmp_path)
    back = LSDDiscreteScheduler.from_pretrained(tmp_path)
    assert back.levels == c.levels and back.temperatures == c.temperatures and back.config.corrector_steps == 1
    assert DiscreteCoefficients.from_dict(back.config.coefficients).meta == {"method": "LSD+"}


@pytest.mark.parametrize("fitted", [False, True])
def test_runs_in_diffusion_gemma_with_one_call_a_step(fitted):
    from tiny_discrete_pipelines import tiny_diffusion_gemma_pipeline

    sched = (LSDDiscreteScheduler.from_coefficients(
        DiscreteCoefficients((0.0, 0.3, 0.6, 0.85, 1.0), (1.5, 0.8, 0.6, 1.0), "uniform")) if fitted
        else LSDDiscreteScheduler())
    pipe = tiny_diffusion_gemma_pipeline(sched, vocab_size=64, canvas_length=8)
    out = pipe(prompt="hello", gen_length=8, num_inference_steps=4, temperature=1.0, confidence_threshold=None,
               output_type="seq", generator=torch.Generator().manual_seed(0))
    assert pipe.call_counter.denoiser_calls == 4
    assert out.sequences.shape == (1, 8) and int(out.sequences.max()) < 64


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1, got 0"):
        LSDDiscreteScheduler().set_timesteps(0)
    s = LSDDiscreteScheduler.from_coefficients(DiscreteCoefficients.plain(4, "uniform"))
    with pytest.raises(ValueError, match="fitted for 4 steps"):
        s.set_timesteps(8)
    with pytest.raises(ValueError, match="temperatures must be 2 finite numbers > 0"):
        LSDDiscreteScheduler(coefficients={"levels": [0.0, 0.5, 1.0], "temperatures": [1.0, math.nan],
                                           "corruption": "uniform"})
    with pytest.raises(ValueError, match="'mask' corruption; LSDDiscreteScheduler samples the uniform kernel"):
        LSDDiscreteScheduler.from_coefficients(DiscreteCoefficients.plain(2, "mask"))
    s = LSDDiscreteScheduler()
    s.set_timesteps(2)
    with pytest.raises(ValueError, match=r"outside the model_output's vocabulary of size 5"):
        s.step(torch.zeros(1, 3, 5), 0, torch.tensor([[0, 7, 1]]))
    with pytest.raises(ValueError, match=r"step index in \[0, 1\], got 2"):
        s.step(torch.zeros(1, 3, 5), 2, torch.tensor([[0, 1, 1]]))
