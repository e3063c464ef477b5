"""Quality metrics: FID through clean-fid's Frechet distance on features of a Fashion-MNIST classifier we train and
ship (offline), trajectory error against a reference solution, and class accuracy of conditional samples."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .zoo import MODELS_DIR

FEATURES_DIR = MODELS_DIR / "fmnist-features"
CACHE_DIR = Path.home() / ".cache" / "fastsample" / "stats"


class FeatureNet(nn.Module):
    """A small CNN classifier on 1 x 32 x 32 images in [-1, 1]; ``features`` are its 128-d penultimate layer."""

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w),
            nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def save(self, path=FEATURES_DIR, extra: dict | None = None):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({**self.config, **(extra or {})}, indent=1))

    @classmethod
    def load(cls, path=FEATURES_DIR) -> "FeatureNet":
        path = Path(path)
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"no feature network at {path}: train it with python scripts/train_classifier.py")
        try:
            cfg = json.loads((path / "config.json").read_text())
            net = cls(int(cfg["width"]), int(cfg["feature_dim"]), int(cfg["num_classes"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path / 'config.json'}: not a feature network config (width, feature_dim, "
                             f"num_classes): {e!r}") from None
        weights = load_file(str(path / "model.safetensors"))
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{path / 'model.safetensors'}: non-finite weights in {bad}")
        try:
            net.load_state_dict(weights)
        except RuntimeError as e:
            raise ValueError(f"{path / 'model.safetensors'} does not fit its config: {e}") from None
        return net.eval().requires_grad_(False)


@torch.no_grad()
def extract(net: FeatureNet, images: torch.Tensor, batch_size: int = 500, logits: bool = False) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1:] != (1, 32, 32):
        raise ValueError(f"images must be N x 1 x 32 x 32 in [-1, 1], got {tuple(images.shape)}")
    fn = net if logits else net.features
    return torch.cat([fn(images[i:i + batch_size].float()) for i in range(0, len(images), batch_size)]).double()


class CleanFIDExtractor(nn.Module):
    """The feature network in clean-fid's convention, to pass as ``custom_feat_extractor``: a batch of B x 3 x 32 x 32
    (or B x 1 x 32 x 32) images as floats in [0, 255] (what clean-fid's folder loader yields for 8-bit images, with
    ``custom_fn_resize=keep_size``) -> B x 128 features."""

    def __init__(self, net: FeatureNet | None = None):
        super().__init__()
        self.net = net or FeatureNet.load()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] not in (1, 3) or batch.shape[2:] != (32, 32):
            raise ValueError(f"batch must be B x 3 x 32 x 32 (or B x 1 x 32 x 32) in [0, 255], got {tuple(batch.shape)}")
        return self.net.features(batch[:, :1].float() / 127.5 - 1.0)


def keep_size(img: np.ndarray) -> np.ndarray:
    """clean-fid's resize hook for our network: the 32 x 32 images stay as they are."""
    return img


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> 8-bit pixel values as floats in [0, 255], as a saved PNG holds them."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


FEATURES = ("fmnist", "inception")


def feature_extractor(feature: str = "fmnist", device="cpu"):
    """A clean-fid feature extractor: ``"fmnist"`` (offline, shipped) or ``"inception"`` (clean-fid's Inception-V3,
    whose weights clean-fid downloads on first use; offline that fails with a clear error)."""
    if feature == "fmnist":
        return CleanFIDExtractor().to(device)
    if feature == "inception":
        from cleanfid.features import build_feature_extractor

        try:
            return build_feature_extractor("clean", torch.device(device), use_dataparallel=False)
        except Exception as e:  # no network and no cached weights
            raise RuntimeError(f"feature='inception' needs clean-fid's Inception weights, which could not be loaded "
                               f"({type(e).__name__}: {e}); use feature='fmnist' offline") from e
    raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")


@torch.no_grad()
def features(images: torch.Tensor, feature: str = "fmnist", extractor=None, batch_size: int = 500,
             device="cpu") -> np.ndarray:
    """clean-fid features of N x 1 x 32 x 32 images in [-1, 1], quantised to 8 bits first (as PNGs would be), through
    clean-fid's own ``get_batch_features``.  Inception gets clean-fid's "clean" PIL-bicubic resize to 299 x 299."""
    from cleanfid.fid import get_batch_features

    if images.ndim != 4 or images.shape[1:] != (1, 32, 32):
        raise ValueError(f"images must be N x 1 x 32 x 32 in [-1, 1], got {tuple(images.shape)}")
    from cleanfid.resize import build_resizer

    extractor = extractor or feature_extractor(feature, device)
    resize = build_resizer("clean") if feature == "inception" else None
    out = []
    for i in range(0, len(images), batch_size):
        px = to_pixels(images[i:i + batch_size]).expand(-1, 3, -1, -1)
        if resize is not None:
            px = torch.stack([torch.from_numpy(resize(p.permute(1, 2, 0).numpy().astype(np.uint8))).permute(2, 0, 1)
                              for p in px]).float()
        out.append(get_batch_features(px, extractor, torch.device(device)))
    return np.concatenate(out).astype(np.float64)


def statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(feats.cpu().numpy() if isinstance(feats, torch.Tensor) else feats, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet(stats1, stats2) -> float:
    """Frechet distance between Gaussians (mu1, sigma1) and (mu2, sigma2), in float64.

    tr sqrt(sigma1 sigma2) is taken as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix sqrt(sigma1) sigma2 sqrt(sigma1), which has the same spectrum; this needs no
    non-symmetric matrix square root (and so no particular scipy version)."""
    mu1, s1 = (np.asarray(a, dtype=np.float64) for a in stats1)
    mu2, s2 = (np.asarray(a, dtype=np.float64) for a in stats2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"stats1 and stats2 must have the same shapes, got {mu1.shape}/{s1.shape} "
                         f"and {mu2.shape}/{s2.shape}")
    w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    inner = root1 @ s2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def fid_between(images1: torch.Tensor, images2: torch.Tensor, feature: str = "fmnist", extractor=None) -> float:
    extractor = extractor or feature_extractor(feature)
    return frechet(statistics(features(images1, feature, extractor)), statistics(features(images2, feature, extractor)))


def tensor_digest(*tensors) -> str:
    """A short hash of the tensors' contents."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


def reference_statistics(images: torch.Tensor, feature: str = "fmnist", extractor=None, cache_dir=CACHE_DIR):
    """(mu, sigma) of ``images``' features, computed once and cached under a hash of the images and the extractor's
    weights."""
    extractor = extractor or feature_extractor(feature)
    key = tensor_digest(images, *extractor.state_dict().values())
    path = Path(cache_dir) / f"{feature}-{key}.safetensors"
    if path.is_file():
        d = load_file(str(path))
        mu, sigma = d.get("mu"), d.get("sigma")
        if (mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (len(mu), len(mu))
                or not (torch.isfinite(mu).all() and torch.isfinite(sigma).all())):
            raise ValueError(f"{path}: a broken reference-statistics cache (mu, sigma of the features); delete it "
                             f"and it is computed again")
        return mu.numpy(), sigma.numpy()
    mu, sigma = statistics(features(images, feature, extractor))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}, str(path))
    return mu, sigma


def fid(samples: torch.Tensor, reference=None, feature: str = "fmnist", extractor=None) -> float:
    """FID of ``samples`` (N x 1 x 32 x 32 in [-1, 1]) against the Fashion-MNIST train split (or ``reference``
    images), with clean-fid on the shipped feature network (or Inception)."""
    return fid_with_se(samples, reference, feature, extractor, num_bootstrap=0)[0]


def fid_with_se(samples: torch.Tensor, reference=None, feature: str = "fmnist", extractor=None,
                num_bootstrap: int = 50, seed: int = 0) -> tuple[float, float | None]:
    """``(FID, its standard error)``: the error is the spread of the FID over ``num_bootstrap`` resamples (with
    replacement) of the samples' features, against the same reference statistics; None with ``num_bootstrap=0``."""
    extractor = extractor or feature_extractor(feature)
    if reference is None:
        from .data import load_fashion_mnist

        reference = load_fashion_mnist("train")[0]
    ref = reference_statistics(reference, feature, extractor)
    feats = features(samples, feature, extractor)
    value = frechet(statistics(feats), ref)
    if num_bootstrap <= 0:
        return value, None
    rng = np.random.default_rng(seed)
    boot = [frechet(statistics(feats[rng.integers(0, len(feats), len(feats))]), ref) for _ in range(num_bootstrap)]
    return value, float(np.std(boot, ddof=1))


def save_pngs(images: torch.Tensor, folder) -> Path:
    """Write N x 1 x H x W images in [-1, 1] as 8-bit grey PNGs 000000.png, 000001.png, ..."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, px in enumerate(to_pixels(images).to(torch.uint8)[:, 0].cpu().numpy()):
        Image.fromarray(px).save(folder / f"{i:06d}.png")
    return folder


def fid_folders(folder1, folder2, batch_size: int = 500) -> float:
    """FID between two folders of 32 x 32 PNGs, read by clean-fid's own loader, on the shipped feature network."""
    from cleanfid import fid as cfid

    extractor = CleanFIDExtractor()

    def stats(folder):
        return statistics(cfid.get_folder_features(str(folder), extractor, num_workers=0, batch_size=batch_size,
                                                   device=torch.device("cpu"), mode="clean",
                                                   custom_fn_resize=keep_size, verbose=False))

    return frechet(stats(folder1), stats(folder2))


def trajectory_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 error ||x - ref|| / ||ref|| over the whole batch."""
    return float((x.double() - reference.double()).norm() / reference.double().norm())


def _sqrt_ratio_with_se(num: torch.Tensor, den: torch.Tensor) -> tuple[float, float]:
    """sqrt(sum num / sum den) over per-sample terms, and its delete-one jackknife standard error."""
    num, den = num.double(), den.double()
    n, a, b = len(num), num.sum(), den.sum()
    value = float(torch.sqrt(a / b))
    if n < 2:
        return value, float("nan")
    loo = torch.sqrt((a - num) / (b - den))
    return value, float(torch.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))


def _check_pair(x: torch.Tensor, reference: torch.Tensor) -> None:
    if x.shape != reference.shape or x.ndim < 1 or len(x) == 0:
        raise ValueError(f"x and reference must be batches of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(reference.shape)}")


def rmse_with_se(x: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(RMSE, its standard error)`` of a batch of end points against reference end points from the same noise:
    the root of the mean squared difference over every pixel of every sample, the error by the jackknife over
    samples."""
    _check_pair(x, reference)
    d = (x.double() - reference.double()).flatten(1)
    return _sqrt_ratio_with_se((d ** 2).sum(1), torch.full((len(d),), float(d.shape[1]), dtype=torch.float64))


def trajectory_error_with_se(x: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(trajectory_error, its jackknife standard error over samples)``."""
    _check_pair(x, reference)
    d, r = (x.double() - reference.double()).flatten(1), reference.double().flatten(1)
    return _sqrt_ratio_with_se((d ** 2).sum(1), (r ** 2).sum(1))


def class_accuracy(samples: torch.Tensor, labels: torch.Tensor, net: FeatureNet | None = None) -> float:
    """Share of conditional samples the shipped classifier assigns to their intended class (8-bit pixels first)."""
    return class_accuracy_with_se(samples, labels, net)[0]


def class_accuracy_with_se(samples: torch.Tensor, labels: torch.Tensor,
                           net: FeatureNet | None = None) -> tuple[float, float]:
    """``(class accuracy, its binomial standard error sqrt(p (1 - p) / n))`` over the n samples."""
    net = net or FeatureNet.load()
    quantised = to_pixels(samples) / 127.5 - 1.0
    p = float((extract(net, quantised, logits=True).argmax(1).cpu() == labels.cpu()).double().mean())
    return p, math.sqrt(p * (1 - p) / len(labels))
