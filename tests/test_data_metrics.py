"""Data loading (tiny IDX files written here), the model zoo, training resumption and the FID machinery."""
import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsample import zoo
from fastsample.data import load_fashion_mnist, read_idx
from fastsample.metrics import FeatureNet, class_accuracy, extract, fid_between, reference_statistics, trajectory_error

ROOT = Path(__file__).resolve().parent.parent


def write_idx(path: Path, arr: np.ndarray, gz: bool = True):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 16)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)), gz=(split == "train"))
        if split == "t10k":  # one file plain, one gzipped: both are read
            (root / "t10k-labels-idx1-ubyte.gz").rename(root / "t10k-labels-idx1-ubyte")
    return root


def test_load_tiny_idx(tiny_dataset):
    x, y = load_fashion_mnist("train", tiny_dataset)
    raw = read_idx(tiny_dataset / "train-images-idx3-ubyte.gz")
    assert x.shape == (64, 1, 32, 32) and y.shape == (64,) and y.dtype == torch.int64
    assert torch.allclose(x[:, 0, 2:30, 2:30], torch.from_numpy(raw / 127.5 - 1.0).float(), atol=1e-6)
    assert (x[:, :, :2] == -1).all() and x.min() >= -1 and x.max() <= 1
    xt, yt = load_fashion_mnist("test", tiny_dataset)
    assert xt.shape == (16, 1, 32, 32) and yt.shape == (16,)


def test_bad_idx_and_missing_data(tmp_path, monkeypatch):
    import fastsample.data

    monkeypatch.setattr(fastsample.data, "DEBIAN_PATH", str(tmp_path / "no-debian-package"))
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01abcd"))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(FileNotFoundError, match="the path given.*dataset-fashion-mnist.*torchvision"):
        from fastsample.data import dataset_root

        dataset_root(tmp_path)  # a path is given: only it and Debian's package are searched before the download
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("val", tmp_path)


def test_zoo_names():
    with pytest.raises(ValueError, match="model must be one of"):
        zoo.load("imagenet")
    for name, (cfg, classes) in zoo.MODEL_CONFIGS.items():
        n = sum(p.numel() for p in zoo.build(name).parameters())
        assert (2e5 < n < 4e5) if name == "fmnist-small" else (2e6 < n < 4e6), (name, n)


def test_training_resumes_exactly(tiny_dataset, tmp_path):
    """Two steps, then a resumed run to four, equal four uninterrupted steps."""
    def train(out, steps):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--model", "fmnist-small", "--steps", str(steps),
                        "--batch-size", "4", "--data", str(tiny_dataset), "--out", str(out), "--threads", "1"],
                       check=True, capture_output=True, cwd=ROOT)

    train(tmp_path / "a", 2)
    train(tmp_path / "a", 4)
    train(tmp_path / "b", 4)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a" / "ema.safetensors")), load_file(str(tmp_path / "b" / "ema.safetensors"))
    assert json.loads((tmp_path / "a" / "state.json").read_text())["step"] == 4
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_fid_self_near_zero_and_shifted_clearly_above():
    torch.manual_seed(0)
    net = FeatureNet().eval()
    g = torch.Generator().manual_seed(1)
    base = torch.tanh(torch.randn(600, 1, 32, 32, generator=g))
    assert abs(fid_between(base, base, net)) < 1e-6
    other = torch.tanh(torch.randn(600, 1, 32, 32, generator=g))  # same distribution, other draws
    shifted = (base + 0.5).clamp(-1, 1)
    f_same, f_shift = fid_between(base, other, net), fid_between(base, shifted, net)
    assert f_shift > 10 * f_same and f_shift > 0


def test_reference_statistics_are_cached(tmp_path):
    net = FeatureNet().eval()
    imgs = torch.rand(50, 1, 32, 32) * 2 - 1
    mu, sigma = reference_statistics(imgs, net, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    mu2, sigma2 = reference_statistics(imgs, net, cache_dir=tmp_path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)


def test_trajectory_error_and_class_accuracy():
    x = torch.randn(4, 3)
    assert trajectory_error(x, x) == 0 and trajectory_error(2 * x, x) == pytest.approx(1.0)
    net = FeatureNet().eval()
    imgs = torch.rand(20, 1, 32, 32) * 2 - 1
    pred = extract(net, imgs, logits=True).argmax(1)
    assert class_accuracy(imgs, pred, net) == 1.0
    assert class_accuracy(imgs, (pred + 1) % 10, net) == 0.0
    with pytest.raises(ValueError, match="images must be N x 1 x 32 x 32"):
        extract(net, torch.zeros(2, 3, 32, 32))
