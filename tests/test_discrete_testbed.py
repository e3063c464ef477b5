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
from fastsample.discrete import (DiscreteCoefficients, DiscreteNoise, empirical_kl, exact_distribution,  # noqa: E402
                                 exact_kl, keep_levels, sample, transition)


@pytest.mark.parametrize("corruption", ["mask", "uniform"])
def test_plain_sampler_converges_to_the_data_distribution(corruption):
    """Exact KL from the truth to the sampler's output falls with the steps towards 0 (the joint is sampled
    exactly as the steps get fine), and samples' empirical KL agrees with the exact distribution."""
    m = CategoricalMixture.random(length=4, vocab_size=3, components=3, concentration=0.3, seed=0)
    kl = {s: exact_kl(m, DiscreteCoefficients.plain(s, corruption)) for s in (1, 2, 4, 16, 64)}
    assert kl[1] > kl[2] > kl[4] > kl[16] > kl[64] and kl[64] < 0.02 * kl[1], kl
    den = lambda x, a: m.posterior(x, a, corruption)  # noqa: E731
    c = DiscreteCoefficients.plain(2, corruption)
    x = sample(den, c, 100000, 4, 3, seed=3)
    q = exact_distribution(m, c)
    counts = torch.bincount((x * torch.tensor([27, 9, 3, 1])).sum(1), minlength=81).double() / len(x)
    assert (counts - q).abs().max() < 4e-3, (counts - q).abs().max()


def test_transition_is_the_enumerated_posterior():
    """The uniform step's closed form equals sum_v p(x0 = v | x_a) q(x_b | x_a, x0 = v) with q(x_b | x_a, x0) from
    Bayes' rule on the forward kernel, and the masked step unmasks with probability (b - a) / (1 - a)."""
    V, a, b = 4, 0.3, 0.55
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, 3, V, generator=g, dtype=torch.float64), -1)
    x = torch.randint(0, V, (5, 3), generator=g)
    fwd = lambda lo, hi: (lo / hi) * torch.eye(V, dtype=torch.float64) + (1 - lo / hi) / V  # q(x_lo | x_hi)  # noqa: E731
    prior = lambda lvl: lvl * torch.eye(V, dtype=torch.float64) + (1 - lvl) / V              # q(x_lvl | x0)  # noqa: E731
    want = torch.zeros(5, 3, V, dtype=torch.float64)
    for v in range(V):
        joint = fwd(a, b)[x] * prior(b)[v]                 # q(x_a | x_b = j) q(x_b = j | x0 = v), over j
        want += probs[..., v:v + 1] * joint / joint.sum(-1, keepdim=True)
    assert torch.allclose(transition(probs, x, a, b, "uniform"), want, atol=1e-14)
    xm = x.clone()
    xm[0] = V
    t = transition(probs, xm, a, b, "mask")
    assert torch.allclose(t[0, :, V], torch.full((3,), (1 - b) / (1 - a), dtype=torch.float64))
    assert torch.allclose(t[0, :, :V], probs[0] * (b - a) / (1 - a)) and torch.equal(t[1:].argmax(-1), xm[1:])


@pytest.mark.parametrize("corruption", ["mask", "uniform"])
def test_identity_coefficients_are_the_plain_sampler(corruption):
    m = CategoricalMixture.random(length=4, vocab_size=3, components=2, seed=1)
    den = lambda x, a: m.posterior(x, a, corruption)  # noqa: E731
    noise = DiscreteNoise.draw(corruption, 50, 4, 3, seed=0)
    plain = DiscreteCoefficients.plain(4, corruption)
    same = DiscreteCoefficients((0.0, 0.25, 0.5, 0.75, 1.0), (1.0,) * 4, corruption)
    hot = DiscreteCoefficients(plain.levels, (1.0, 1.0, 0.5, 1.0), corruption)
    a, b, c = (sample(den, k, 50, 4, 3, noise=noise) for k in (plain, same, hot))
    assert torch.equal(a, b) and not torch.equal(a, c) and (a < 3).all()
    assert keep_levels(4).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert DiscreteCoefficients.from_dict(hot.to_dict()) == hot


@pytest.mark.parametrize("make, match", [
    (lambda: DiscreteCoefficients.plain(0), "steps must be an integer >= 1"),
    (lambda: DiscreteCoefficients((0.0, 0.5, 1.0), (1.0, math.inf)), "temperatures must be 2 finite numbers > 0"),
    (lambda: DiscreteCoefficients((0.0, 0.5, 1.0), (1.0, math.nan)), "temperatures must be 2 finite numbers > 0"),
    (lambda: DiscreteCoefficients((0.0, 0.6, 0.5, 1.0), (1.0,) * 3), "rise strictly from 0.0 to 1.0"),
    (lambda: DiscreteCoefficients((0.0, math.nan, 1.0), (1.0,) * 2), "levels must be finite"),
    (lambda: DiscreteCoefficients((0.0, 1.0), (1.0,), "gaussian"), "corruption must be one of"),
    (lambda: DiscreteCoefficients.from_dict({"levels": [0.0, 1.0]}), r"missing \['corruption', 'temperatures'\]"),
])
def test_bad_coefficients_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_vocabulary_mismatch_is_named():
    """A denoiser over 3 values driven as if the vocabulary held 5: the sampler names the mismatch (the testbed's
    own denoiser names out-of-range tokens first)."""
    three = lambda x, a: torch.full((*x.shape, 3), 1 / 3, dtype=torch.float64)  # noqa: E731
    for corruption in ("mask", "uniform"):
        with pytest.raises(ValueError, match=r"N x L x V = \(5, 4, 5\) .* is its vocabulary size 5"):
            sample(three, DiscreteCoefficients.plain(2, corruption), 5, 4, 5)
    m = CategoricalMixture.random(length=4, vocab_size=3, components=2, seed=1)
    with pytest.raises(ValueError, match=r"vocabulary size 3, plus the mask 3\), got values in \[5, 5\]"):
        sample(lambda x, a: m.posterior(x, a, "mask"), DiscreteCoefficients.plain(2), 5, 4, 5)


# ---------------------------------------------------------------------------------------------- LSD / LSD+
from fastsample.discrete import alignment_loss, fit_lsd, hamming_mmd  # noqa: E402


def test_hamming_mmd_is_zero_for_equal_sets_and_grows_with_the_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (200, 5), generator=g)
    y = torch.randint(0, 3, (200, 5), generator=g)
    z = torch.zeros(200, 5, dtype=torch.long)
    assert hamming_mmd(x, x[torch.randperm(200, generator=g)]) == pytest.approx(0.0, abs=1e-12)
    assert hamming_mmd(x, y) < hamming_mmd(x, z)


@pytest.mark.parametrize("loss", ["states", "scores"])
def test_a_student_as_fine_as_its_teacher_is_aligned(loss):
    """A student on the teacher's own grid, from the teacher's noise, has zero alignment loss."""
    m = CategoricalMixture.random(length=4, vocab_size=3, components=2, seed=2)
    den = lambda x, a: m.posterior(x, a, "uniform")  # noqa: E731
    noise = DiscreteNoise.draw("uniform", 300, 4, 3, seed=0)
    c = DiscreteCoefficients.plain(8, "uniform")
    _, states, _ = sample(den, c, 300, 4, 3, noise=noise, trajectory=True)
    assert alignment_loss(den, c, noise, {"states": states, "noise": noise}, 3, loss) == pytest.approx(0.0, abs=1e-12)


def test_lsd_plus_lowers_the_exact_kl_and_round_trips(tmp_path):
    """LSD+ fitted to a 256-step teacher (alignment of the state distributions) lowers the exact KL of a 4-step
    uniform sampler on a testbed, and its artefact round-trips through JSON."""
    m = CategoricalMixture.random(length=4, vocab_size=3, components=3, concentration=0.3, seed=0)
    den = lambda x, a: m.posterior(x, a, "uniform")  # noqa: E731
    c = fit_lsd(den, 4, 4, 3, "uniform", learn_levels=True, n=300, max_evals=120)
    plain = exact_kl(m, DiscreteCoefficients.plain(4, "uniform"))
    assert exact_kl(m, c) < 0.9 * plain, (exact_kl(m, c), plain, c)
    assert c.meta["loss_fitted"] <= c.meta["loss_identity"] and c.meta["method"] == "LSD+"
    c.save(tmp_path / "c.json")
    back = DiscreteCoefficients.load(tmp_path / "c.json")
    assert back == c and back.meta == c.meta


def test_bad_fit_arguments_are_named():
    m = CategoricalMixture.random(length=3, vocab_size=3, components=2, seed=1)
    den = lambda x, a: m.posterior(x, a, "mask")  # noqa: E731
    with pytest.raises(ValueError, match="loss must be one of"):
        fit_lsd(den, 2, 3, 3, loss="kl")
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        fit_lsd(den, 0, 3, 3)
    with pytest.raises(ValueError, match="start must be 2-step mask coefficients, got 3-step mask"):
        fit_lsd(den, 2, 3, 3, start=DiscreteCoefficients.plain(3))


@pytest.mark.parametrize("corruption", ["mask", "uniform"])
def test_exact_trajectory_is_the_law_of_the_sampled_states(corruption):
    """The exact intermediate state distributions (exact_trajectory) are the law of the states that sample() visits:
    each sums to one and matches the empirical distribution of 40,000 runs within sampling error."""
    from fastsample.discrete import _states, exact_trajectory, sample

    m = CategoricalMixture.random(length=3, vocab_size=3, components=2, concentration=0.5, seed=3)
    den = lambda x, a: m.posterior(x, a, corruption)  # noqa: E731
    c = DiscreteCoefficients((0.0, 0.3, 0.7, 1.0), (1.0, 0.8, 1.3), corruption)
    exact = exact_trajectory(m, c)
    _, states, _ = sample(den, c, 40000, 3, 3, seed=5, trajectory=True)
    C = 4 if corruption == "mask" else 3
    weights = C ** torch.arange(2, -1, -1)
    assert len(exact) == len(states) == 4
    for p, x in zip(exact, states):
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
        freq = torch.bincount((x.long() * weights).sum(1), minlength=C ** 3).double() / len(x)
        assert float((freq - p).abs().max()) < 0.01
    assert _states(3, C).shape == (C ** 3, 3)


def test_exact_alignment_is_zero_on_the_teachers_grid_and_a_fit_lowers_it(tmp_path):
    """The exact alignment loss of the teacher's own coefficients is 0; an exact LSD+ fit lowers the loss and the
    exact KL of a 4-step uniform sampler, and its artefact round-trips."""
    from fastsample.discrete import exact_alignment_loss, exact_trajectory, fit_lsd_exact

    m = CategoricalMixture.random(length=4, vocab_size=3, components=3, concentration=0.3, seed=0)
    teacher = exact_trajectory(m, DiscreteCoefficients.plain(8, "uniform"))
    assert exact_alignment_loss(m, DiscreteCoefficients.plain(8, "uniform"), teacher) == pytest.approx(0.0, abs=1e-12)
    assert exact_alignment_loss(m, DiscreteCoefficients.plain(4, "uniform"), teacher) > 1e-3
    c = fit_lsd_exact(m, 4, "uniform", learn_levels=True, teacher_steps=64, max_evals=150)
    assert c.meta["loss_fitted"] < c.meta["loss_identity"] and c.meta["loss"] == "exact"
    assert exact_kl(m, c) < exact_kl(m, DiscreteCoefficients.plain(4, "uniform"))
    c.save(tmp_path / "c.json")
    assert DiscreteCoefficients.load(tmp_path / "c.json") == c
    with pytest.raises(ValueError, match="start must be 4-step uniform coefficients"):
        fit_lsd_exact(m, 4, "uniform", start=DiscreteCoefficients.plain(4, "mask"))


def test_step_weights_and_the_final_weighting_is_the_end_states_kl():
    """The alignment terms' weights: all 1, rising to 1, or the last step alone; under "final" the exact alignment
    loss is the KL between the teacher's and the student's output distributions."""
    from fastsample.discrete import exact_alignment_loss, exact_trajectory, step_weights

    assert step_weights(4, "uniform") == [1.0] * 4
    assert step_weights(4, "linear") == [0.25, 0.5, 0.75, 1.0]
    assert step_weights(4, "final") == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="weighting must be one of .*got 'last'"):
        step_weights(4, "last")
    m = CategoricalMixture.random(length=3, vocab_size=3, components=2, concentration=0.5, seed=3)
    c = DiscreteCoefficients((0.0, 0.3, 0.7, 1.0), (1.0, 0.8, 1.3), "uniform")
    teacher = exact_trajectory(m, DiscreteCoefficients.plain(32, "uniform"))
    p, q = teacher[-1], exact_trajectory(m, c)[-1]
    kl = float((p * (p.log() - q.log())).sum())
    assert exact_alignment_loss(m, c, teacher, "final") == pytest.approx(kl, rel=1e-12)
    parts = [exact_alignment_loss(m, c, teacher, w) for w in ("uniform", "linear", "final")]
    assert parts[0] > parts[1] > parts[2] > 0


def test_end_state_alignment_fits_lower_the_exact_kl():
    """LSD+ fitted on the end state alone, by sampled MMD and exactly, lowers a 4-step uniform sampler's exact KL;
    a bad weighting is named before any run."""
    from fastsample.discrete import fit_lsd_exact

    m = CategoricalMixture.random(length=4, vocab_size=3, components=3, concentration=0.3, seed=0)
    den = lambda x, a: m.posterior(x, a, "uniform")  # noqa: E731
    plain = exact_kl(m, DiscreteCoefficients.plain(4, "uniform"))
    c = fit_lsd(den, 4, 4, 3, "uniform", learn_levels=True, n=300, max_evals=120, weighting="final")
    assert exact_kl(m, c) < 0.9 * plain and c.meta["weighting"] == "final"
    e = fit_lsd_exact(m, 4, "uniform", learn_levels=True, teacher_steps=64, max_evals=150, weighting="final")
    assert exact_kl(m, e) < 0.7 * plain, (exact_kl(m, e), plain)
    with pytest.raises(ValueError, match="weighting must be one of"):
        fit_lsd(den, 4, 4, 3, "uniform", weighting="end")
    with pytest.raises(ValueError, match="weighting must be one of"):
        fit_lsd_exact(m, 4, "uniform", weighting="end")
