"""The shipped learned discrete-diffusion model and its evaluator: scikit-learn's 8 x 8 digits as 64 tokens of 17
levels (the pixel values 0..16), denoised by a small MLP under uniform corruption (``DiscreteDDIMScheduler``'s
kernel), trained by scripts/train_discrete.py and saved with save_pretrained under fastsample/models/digits-uniform.

The evaluator scores samples two ways, both from the digits alone (nothing downloaded):
- the Fréchet distance between the features of a small digit classifier on the samples and on the held-out digits
  (the FID analogue), with a bootstrap standard error;
- the NLL of the samples under a mixture of product-categoricals fitted by EM to the training digits (an exact,
  held-out density; it rewards mode seeking, so read it beside the Fréchet distance).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .metrics import frechet, statistics
from .testbeds import CategoricalMixture

MODELS_DIR = Path(__file__).resolve().parent / "models"
DIGITS_MODEL = "digits-uniform"
LEVELS = 17
LENGTH = 64
HELD_OUT = 297          # of the 1,797 digits; the rest train the model and the evaluator


def digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train tokens, train labels, held-out tokens, held-out labels): the digits as N x 64 integers in 0..16, split
    by a fixed permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.data.astype(np.int64))
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    test, train = perm[:HELD_OUT], perm[HELD_OUT:]
    return x[train], y[train], x[test], y[test]


class DiscreteMLPDenoiser(ModelMixin, ConfigMixin):
    """p(x0 | x, alpha) for ``length`` tokens of ``vocab_size`` values: the one-hot tokens and a sinusoidal
    embedding of the keep level go through a residual MLP to per-position logits."""

    @register_to_config
    def __init__(self, length: int = LENGTH, vocab_size: int = LEVELS, hidden: int = 512, layers: int = 3,
                 level_features: int = 32):
        super().__init__()
        self.embed = torch.nn.Linear(length * vocab_size + level_features, hidden)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, hidden),
                                                              torch.nn.SiLU(), torch.nn.Linear(hidden, hidden))
                                          for _ in range(layers))
        self.out = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, length * vocab_size))
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(200.0), level_features // 2)),
                             persistent=False)

    def forward(self, tokens: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        n, (L, V) = len(tokens), (self.config.length, self.config.vocab_size)
        if tokens.shape[1:] != (L,) or int(tokens.max()) >= V or int(tokens.min()) < 0:
            raise ValueError(f"tokens must be N x {L} integers in [0, {V - 1}], got shape {tuple(tokens.shape)} and "
                             f"values in [{int(tokens.min())}, {int(tokens.max())}]")
        alpha = torch.as_tensor(alpha, dtype=self.embed.weight.dtype, device=tokens.device).reshape(-1).expand(n)
        phase = alpha[:, None] * self.freqs[None]
        h = torch.cat([torch.nn.functional.one_hot(tokens, V).flatten(1).to(phase.dtype), phase.sin(), phase.cos()], 1)
        h = self.embed(h)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).view(n, L, V)


def load_digits_model(path=None) -> DiscreteMLPDenoiser:
    return DiscreteMLPDenoiser.from_pretrained(str(path or MODELS_DIR / DIGITS_MODEL)).eval()


def as_denoiser(model: DiscreteMLPDenoiser, batch: int = 4096):
    """The model as a :mod:`fastsample.discrete` denoiser: ``(x, alpha) -> N x L x V`` float64 probabilities."""

    @torch.no_grad()
    def denoiser(x, alpha):
        alpha = float(alpha)
        return torch.cat([torch.softmax(model(part, torch.tensor(alpha)).double(), -1) for part in x.split(batch)])

    return denoiser


# ---------------------------------------------------------------------------------------------- the evaluator
def fit_mixture(x: torch.Tensor, components: int = 64, vocab_size: int = LEVELS, iterations: int = 100,
                smoothing: float = 0.5, seed: int = 0) -> CategoricalMixture:
    """A mixture of product-categoricals fitted to tokens ``x`` by EM (Dirichlet smoothing ``smoothing``)."""
    hot = torch.nn.functional.one_hot(x, vocab_size).double()                      # N x L x V
    resp = torch.from_numpy(np.random.default_rng(seed).dirichlet(np.ones(components), size=len(x)))
    for _ in range(iterations):
        counts = torch.einsum("nk,nlv->klv", resp, hot) + smoothing
        probs = counts / counts.sum(-1, keepdim=True)
        weights = (resp.sum(0) + 1.0) / (len(x) + components)
        logp = torch.einsum("nlv,klv->nk", hot, torch.log(probs)) + torch.log(weights)
        resp = torch.softmax(logp, dim=1)
    return CategoricalMixture(probs, weights / weights.sum())


class DigitsEvaluator:
    """The held-out scores of digit samples: ``fd`` (Fréchet distance of classifier features to the held-out
    digits, bootstrap SE) and ``nll`` (mean NLL in nats per image under an EM mixture of the training digits, SE)."""

    def __init__(self, seed: int = 0):
        train_x, train_y, self.test_x, _ = digits_split()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(LENGTH, 256), torch.nn.SiLU(), torch.nn.Linear(256, 128),
                                       torch.nn.SiLU(), torch.nn.Linear(128, 10))
        opt = torch.optim.Adam(self.net.parameters(), lr=2e-3, weight_decay=1e-4)
        xs = train_x.float() / 16
        for _ in range(600):
            idx = torch.randint(0, len(xs), (256,))
            loss = torch.nn.functional.cross_entropy(self.net(xs[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.net.eval()
        self.mixture = fit_mixture(train_x, seed=seed)
        self.ref_features = self.features(self.test_x)
        self.ref = statistics(self.ref_features)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[:4](x.float() / 16).double()

    def fd(self, x: torch.Tensor, bootstrap: int = 20, seed: int = 0) -> tuple[float, float]:
        f = self.features(x)
        g = torch.Generator().manual_seed(seed)
        boots = [frechet(statistics(f[torch.randint(0, len(f), (len(f),), generator=g)]), self.ref)
                 for _ in range(bootstrap)]
        return frechet(statistics(f), self.ref), float(np.std(boots, ddof=1))

    def fd_difference(self, x: torch.Tensor, y: torch.Tensor, bootstrap: int = 200, seed: int = 0,
                      resample_reference: bool = True) -> tuple[float, float]:
        """FD(x) - FD(y) and its paired bootstrap SE: each replicate draws one set of sample indices for both (where
        sample k of each comes from the same seed stream their errors are correlated, and pairing removes the shared
        part) and, with
        ``resample_reference``, one set of held-out digits, so the SE is that of the difference, not of either FD.
        Without it the held-out digits stay fixed: the SE then covers the samples' seeds alone."""
        if x.shape != y.shape:
            raise ValueError(f"x and y must be paired samples of the same shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 2:
            raise ValueError(f"bootstrap must be an integer of at least 2, got {bootstrap!r}")
        fx, fy, ref = self.features(x), self.features(y), self.ref_features
        g = torch.Generator().manual_seed(seed)
        boots = []
        for _ in range(bootstrap):
            i = torch.randint(0, len(fx), (len(fx),), generator=g)
            r = statistics(ref[torch.randint(0, len(ref), (len(ref),), generator=g)]) if resample_reference else self.ref
            boots.append(frechet(statistics(fx[i]), r) - frechet(statistics(fy[i]), r))
        return frechet(statistics(fx), self.ref) - frechet(statistics(fy), self.ref), float(np.std(boots, ddof=1))

    def nll(self, x: torch.Tensor) -> tuple[float, float]:
        v = -self.mixture.log_prob(x)
        return float(v.mean()), float(v.std() / math.sqrt(len(v)))
