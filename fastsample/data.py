"""Fashion-MNIST: from a path you give, Debian's dataset-fashion-mnist package, or torchvision's download.

Images come as float tensors in [-1, 1], padded to 32x32 (N x 1 x 32 x 32), with int64 labels 0-9.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

DEBIAN_PATH = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzipped or not): unsigned-byte data of any rank."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file (too short)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {arr.size} values")
    return arr.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _torchvision_root() -> Path | None:
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError:
        return None
    root = Path(os.environ.get("FASTSAMPLE_DATA", Path.home() / ".cache" / "fastsample"))
    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception:  # offline: torchvision cannot fetch it
        return None
    return root / "FashionMNIST" / "raw"


def dataset_root(path=None) -> Path:
    """``path`` when given (it must hold all four files: no silent fallback to another copy), else the first of
    Debian's package and torchvision's download that holds them."""
    if path is not None:
        root = Path(path)
        missing = [s for pair in FILES.values() for s in pair if not _find(root, s)]
        if missing:
            raise FileNotFoundError(f"the Fashion-MNIST folder given ({path}) lacks {', '.join(missing)} (.gz or "
                                    f"not); pass a folder with all four IDX files, or no path to use {DEBIAN_PATH}")
        return root
    candidates = [Path(DEBIAN_PATH)]
    for root in candidates:
        if all(_find(root, stem) for pair in FILES.values() for stem in pair):
            return root
    if path is None:
        tv = _torchvision_root()
        if tv is not None:
            return tv
    raise FileNotFoundError(
        "Fashion-MNIST not found. Looked in: "
        + (f"the path given ({path}), " if path is not None else "")
        + f"{DEBIAN_PATH} (install Debian's package: apt-get install dataset-fashion-mnist), "
        + "and torchvision's download (needs torchvision and a network). Pass path= to a folder holding "
        + ", ".join(s + "[.gz]" for pair in FILES.values() for s in pair) + ".")


def load_fashion_mnist(split: str = "train", path=None, pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], N x 1 x (28 + 2 pad) x (28 + 2 pad) float32, labels int64)."""
    if split not in FILES:
        raise ValueError(f"split must be one of {tuple(FILES)}, got {split!r}")
    root = dataset_root(path)
    img_stem, lab_stem = FILES[split]
    images = read_idx(_find(root, img_stem))
    labels = read_idx(_find(root, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    if pad:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def image_grid(x: torch.Tensor, scale: int = 4):
    """N x 1 x H x W images in [-1, 1] -> a PIL image: a near-square grid with 2-pixel gaps, upscaled ``scale`` x."""
    from PIL import Image

    n, (h, w) = x.shape[0], x.shape[-2:]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2), dtype=np.uint8)
    imgs = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()
    for k, img in enumerate(imgs):
        r, c = divmod(k, cols)
        canvas[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = img
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
