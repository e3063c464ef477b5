"""The digits scores of issue 23: the paired FD difference is the difference of the FDs, and its pairing removes the
variance the two sample sets share."""
import pytest
import torch

from fastsample.discrete_models import LEVELS, DigitsEvaluator, digits_split


@pytest.fixture(scope="module")
def ev():
    return DigitsEvaluator()


@pytest.fixture(scope="module")
def pair():
    train_x = digits_split()[0]
    x = train_x[:600].clone()
    y = x.clone()
    g = torch.Generator().manual_seed(0)
    y[:30] = torch.randint(0, LEVELS, y[:30].shape, generator=g)  # 5% of the samples differ
    return x, y


def test_fd_difference_is_the_difference_of_the_fds(ev, pair):
    x, y = pair
    d, se = ev.fd_difference(x, y, bootstrap=20)
    assert d == pytest.approx(ev.fd(x)[0] - ev.fd(y)[0], rel=1e-10, abs=1e-10)
    assert d < 0 and se > 0  # the corrupted rows move y away from the digits
    same, se_same = ev.fd_difference(x, x, bootstrap=20)
    assert same == 0.0 and se_same == 0.0


def test_pairing_cancels_the_shared_sampling_noise(ev, pair):
    """x and y share 95% of their samples: the paired SE over the seeds is far below either FD's own bootstrap SE."""
    x, y = pair
    _, paired = ev.fd_difference(x, y, bootstrap=40, resample_reference=False)
    assert paired < 0.5 * min(ev.fd(x, bootstrap=40)[1], ev.fd(y, bootstrap=40)[1])
    _, with_reference = ev.fd_difference(x, y, bootstrap=40)
    assert with_reference > 0


def test_fd_difference_bad_input(ev, pair):
    x, _ = pair
    with pytest.raises(ValueError, match="same shape"):
        ev.fd_difference(x, x[:-1])
    with pytest.raises(ValueError, match="bootstrap must be an integer of at least 2, got 1"):
        ev.fd_difference(x, x, bootstrap=1)
