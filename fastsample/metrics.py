"""Quality metrics: FID through clean-fid's Frechet distance on features of a Fashion-MNIST classifier we train and
ship (offline), trajectory error against a reference solution, and class accuracy of conditional samples."""
from __future__ import annotations

import hashlib
import json
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
        cfg = json.loads((path / "config.json").read_text())
        net = cls(cfg["width"], cfg["feature_dim"], cfg["num_classes"])
        net.load_state_dict(load_file(str(path / "model.safetensors")))
        return net.eval().requires_grad_(False)


@torch.no_grad()
def extract(net: FeatureNet, images: torch.Tensor, batch_size: int = 500, logits: bool = False) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1:] != (1, 32, 32):
        raise ValueError(f"images must be N x 1 x 32 x 32 in [-1, 1], got {tuple(images.shape)}")
    fn = net if logits else net.features
    return torch.cat([fn(images[i:i + batch_size].float()) for i in range(0, len(images), batch_size)]).double()


def statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.cpu().numpy().astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet(stats1, stats2) -> float:
    from cleanfid.fid import frechet_distance

    return float(frechet_distance(stats1[0], stats1[1], stats2[0], stats2[1]))


def fid_between(images1: torch.Tensor, images2: torch.Tensor, net: FeatureNet | None = None) -> float:
    net = net or FeatureNet.load()
    return frechet(statistics(extract(net, images1)), statistics(extract(net, images2)))


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


def reference_statistics(images: torch.Tensor, net: FeatureNet | None = None, cache_dir=CACHE_DIR):
    """(mu, sigma) of ``images``' features, cached under a hash of the images and the network's weights."""
    net = net or FeatureNet.load()
    key = _digest(images, *net.state_dict().values())
    path = Path(cache_dir) / f"fmnist-features-{key}.safetensors"
    if path.is_file():
        d = load_file(str(path))
        return d["mu"].numpy(), d["sigma"].numpy()
    mu, sigma = statistics(extract(net, images))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}, str(path))
    return mu, sigma


def fid(samples: torch.Tensor, reference=None, net: FeatureNet | None = None) -> float:
    """FID of ``samples`` (N x 1 x 32 x 32 in [-1, 1]) against the Fashion-MNIST train split (or ``reference``
    images), on the shipped feature network."""
    net = net or FeatureNet.load()
    if reference is None:
        from .data import load_fashion_mnist

        reference = load_fashion_mnist("train")[0]
    return frechet(statistics(extract(net, samples)), reference_statistics(reference, net))


def trajectory_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 error ||x - ref|| / ||ref|| over the whole batch."""
    return float((x.double() - reference.double()).norm() / reference.double().norm())


def class_accuracy(samples: torch.Tensor, labels: torch.Tensor, net: FeatureNet | None = None) -> float:
    """Share of conditional samples the classifier assigns to their intended class."""
    net = net or FeatureNet.load()
    return float((extract(net, samples, logits=True).argmax(1).cpu() == labels.cpu()).double().mean())
