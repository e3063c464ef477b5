"""The discrete testbed (issue 23): exact posteriors equal brute-force enumeration on a tiny case, the
log-likelihood is normalised, samples follow the mixture, and bad input is named."""
import itertools
import math

import pytest
import torch

from fastsample.testbeds import CategoricalMixture


@pytest.fixture(scope="module")
def tiny():
    return CategoricalMixture.random(length=3, vocab_size=3, components=2, concentration=0.7, seed=4)


def brute_posterior(m, x, alpha, corruption):
    """p(x0_l = v | x) by enumerating every clean sequence."""
    V, L = m.vocab_size, m.length
    out = torch.zeros(L, V, dtype=torch.float64)
    for seq in itertools.product(range(V), repeat=L):
        x0 = torch.tensor([seq])
        p = math.exp(float(m.log_prob(x0)))
        for l in range(L):
            if corruption == "mask":
                p *= (1 - alpha) if int(x[l]) == m.mask_id else (alpha if int(x[l]) == seq[l] else 0.0)
            else:
                p *= alpha * (int(x[l]) == seq[l]) + (1 - alpha) / V
        for l in range(L):
            out[l, seq[l]] += p
    return out / out[0].sum()


def test_log_prob_sums_to_one(tiny):
    every = torch.tensor(list(itertools.product(range(3), repeat=3)))
    assert float(torch.logsumexp(tiny.log_prob(every), 0)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("corruption", ["mask", "uniform"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8])
def test_posterior_equals_brute_force(tiny, corruption, alpha):
    g = torch.Generator().manual_seed(0)
    x0 = tiny.sample_data(6, g)
    x = tiny.corrupt(x0, alpha, corruption, g)
    if corruption == "mask":
        x[0] = tiny.mask_id  # fully masked: the prior marginals
        if alpha > 0:
            x[1] = x0[1]     # nothing masked (possible only at alpha > 0)
    post = tiny.posterior(x, alpha, corruption)
    for i in range(len(x)):
        assert torch.allclose(post[i], brute_posterior(tiny, x[i], alpha, corruption), atol=1e-12), (i, x[i])


def test_samples_follow_the_mixture(tiny):
    x0 = tiny.sample_data(40000, torch.Generator().manual_seed(1))
    marg = torch.stack([torch.bincount(x0[:, l], minlength=3) for l in range(3)]).double() / len(x0)
    exact = (tiny.weights[:, None, None] * tiny.probs).sum(0)
    assert torch.allclose(marg, exact, atol=0.01)


@pytest.mark.parametrize("call, match", [
    (lambda m: m.posterior(torch.tensor([[0, 1, 5]]), 0.5), r"tokens must be integers in \[0, 3\]"),
    (lambda m: m.posterior(torch.tensor([[0, 1]]), 0.5), "tokens must be N x 3"),
    (lambda m: m.log_prob(torch.tensor([[0, 1, 3]])), r"tokens must be integers in \[0, 2\]"),
    (lambda m: m.corrupt(torch.tensor([[0, 1, 2]]), 1.5), r"alpha .* must be a number in \[0, 1\]"),
    (lambda m: m.posterior(torch.tensor([[0, 1, 2]]), 0.5, "gaussian"), "corruption must be one of"),
    (lambda m: CategoricalMixture(torch.ones(2, 3, 3)), "sum to 1"),
])
def test_bad_input_is_named(tiny, call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny)


# ---------------------------------------------------------------------------------------------- the plain sampler
from fastsample.discrete import empirical_kl, keep_levels, masked_sample  # noqa: E402


def test_plain_sampler_converges_to_the_data_distribution():
    """KL from the truth to the sampler's empirical distribution falls with the steps, to the floor of exact
    samples' own empirical KL; one token at a time (steps >> L) samples the joint exactly."""
    m = CategoricalMixture.random(length=4, vocab_size=3, components=3, concentration=0.3, seed=0)
    den = lambda x, a: m.posterior(x, a, "mask")  # noqa: E731
    n = 60000
    floor = empirical_kl(m, m.sample_data(n, torch.Generator().manual_seed(9)))
    kl = {s: empirical_kl(m, masked_sample(den, n, 4, 3, s, generator=torch.Generator().manual_seed(1)))
          for s in (1, 2, 4, 64)}
    assert kl[1] > kl[2] > kl[4] > kl[64] and kl[64] < 2 * floor + 1e-3 and kl[1] > 10 * floor, (kl, floor)


def test_unit_temperatures_are_the_plain_sampler_and_bad_input_is_named():
    m = CategoricalMixture.random(length=4, vocab_size=3, components=2, seed=1)
    den = lambda x, a: m.posterior(x, a, "mask")  # noqa: E731
    a = masked_sample(den, 50, 4, 3, 4, generator=torch.Generator().manual_seed(0))
    b = masked_sample(den, 50, 4, 3, 4, temperatures=[1.0] * 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and (a < 3).all()
    assert keep_levels(4).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    for kw, match in ((dict(steps=0), "steps must be an integer >= 1"),
                      (dict(steps=4, temperatures=[1.0, math.inf, 1.0, 1.0]), "temperatures must be 4 finite"),
                      (dict(steps=4, vocab_size=5), r"vocabulary size 3, plus the mask 3\), got values in \[5, 5\]")):  # the testbed names it
        with pytest.raises(ValueError, match=match):
            masked_sample(den, 5, 4, kw.pop("vocab_size", 3), **kw)
