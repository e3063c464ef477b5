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
