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
from fastsample.metrics import (CleanFIDExtractor, FeatureNet, class_accuracy, extract, fid, fid_between, fid_folders, frechet,
                                feature_extractor, features, reference_statistics, save_pngs, trajectory_error)

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
    with pytest.raises(FileNotFoundError, match=r"the Fashion-MNIST folder given .* lacks train-images-idx3-ubyte"):
        from fastsample.data import dataset_root

        dataset_root(tmp_path)  # a path is given: only it, never a silent fallback to another copy (issue 20 F16)
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("val", tmp_path)


def test_zoo_names():
    with pytest.raises(ValueError, match="model must be one of"):
        zoo.load("imagenet")
    for name, (cfg, classes) in zoo.MODEL_CONFIGS.items():
        n = sum(p.numel() for p in zoo.build(name).parameters())
        # the sizes: small about 0.3M, large 2-4M; the conditional model is mid-sized so that it trains on a CPU
        lo, hi = {"fmnist-small": (1e5, 3e5), "fmnist-large": (2e6, 4e6), "fmnist-cond": (5e5, 1e6)}[name]
        assert lo < n < hi, (name, n)


def _train(tiny_dataset, out, steps, *extra):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--model", "fmnist-small",
                           "--steps", str(steps), "--batch-size", "4", "--data", str(tiny_dataset), "--out", str(out),
                           "--threads", "1", "--warmup", "2", *extra], capture_output=True, text=True, cwd=ROOT)


def test_training_resumes_exactly(tiny_dataset, tmp_path):
    """Three steps, then a resumed run to six, equal six uninterrupted steps (the cosine schedule spans the six)."""
    from safetensors.torch import load_file

    assert _train(tiny_dataset, tmp_path / "a", 6, "--max-minutes", "0").returncode == 0  # stops after one step
    assert json.loads((tmp_path / "a" / "state.json").read_text())["step"] == 1
    assert _train(tiny_dataset, tmp_path / "a", 6, "--save-every", "3").returncode == 0
    assert _train(tiny_dataset, tmp_path / "b", 6).returncode == 0
    for name in ("model", "ema"):
        a, b = (load_file(str(tmp_path / d / f"{name}.safetensors")) for d in "ab")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((tmp_path / "a" / "state.json").read_text())
    assert state["step"] == 6 and state["adam_step"] == 6 and state["files"] == ["ema", "model", "optimizer"]


def test_training_resumes_from_a_clone_without_the_optimizer_moments(tiny_dataset, tmp_path):
    """git keeps the weights and state.json but not optimizer.safetensors: a clone resumes with fresh AdamW moments
    (a new warmup from the checkpoint's step) instead of failing on the missing file."""
    out = tmp_path / "a"
    assert _train(tiny_dataset, out, 6, "--save-every", "3", "--max-minutes", "0").returncode == 0
    (out / "optimizer.safetensors").unlink()
    assert json.loads((out / "state.json").read_text())["files"] == ["ema", "model", "optimizer"]
    r = _train(tiny_dataset, out, 4)
    assert r.returncode == 0, r.stderr[-2000:]
    state = json.loads((out / "state.json").read_text())
    assert state["step"] == 4 and state["warm_from"] == 1 and state["adam_step"] == 3


def test_nan_or_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert _train(tiny_dataset, out, 50, "--max-minutes", "0").returncode == 0
    good = load_file(str(out / "ema.safetensors"))
    # a learning rate of 1e4 blows the weights up within a few steps: inf/NaN losses or a diverged mean
    r = _train(tiny_dataset, out, 60, "--lr", "1e4", "--warmup", "0", "--save-every", "1")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "last good checkpoint" in r.stderr
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stopped"
    kept = load_file(str(out / "ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in kept.values())
    state = json.loads((out / "state.json").read_text())
    if state["step"] == 1:  # nothing after the first checkpoint was good
        assert all(torch.equal(good[k], kept[k]) for k in good)


def test_an_interrupted_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """A kill while the tensors are written keeps the old checkpoint; a kill after the commit point (state.json.new)
    and during the renames is finished on opening, giving the new one."""
    import os

    from fastsample import training

    def tensors(v):
        return {"model": {"w": torch.full((3,), float(v))}, "ema": {"w": torch.full((3,), v + 0.5)}}

    training.save_checkpoint(tmp_path, tensors(1), {"step": 1})
    real = training._fsync
    calls = {"n": 0}

    def dying(path):  # the kill comes while the second file is written
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(training, "_fsync", dying)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(tmp_path, tensors(2), {"step": 2})
    monkeypatch.setattr(training, "_fsync", real)
    assert list(tmp_path.glob("*.new"))  # the half-written save is on disk
    assert training.load_state(tmp_path)["step"] == 1 and not list(tmp_path.glob("*.new"))
    assert torch.equal(training.load_tensors(tmp_path, "model")["w"], torch.full((3,), 1.0))

    real_replace, renames = os.replace, {"n": 0}

    def dying_replace(src, dst):  # the kill comes after the journal, between two renames
        renames["n"] += 1
        if renames["n"] == 3:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(training.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(tmp_path, tensors(3), {"step": 3})
    monkeypatch.setattr(training.os, "replace", real_replace)
    assert (tmp_path / "state.json.new").is_file()
    assert training.load_state(tmp_path)["step"] == 3
    for name, v in (("model", 3.0), ("ema", 3.5)):
        assert torch.equal(training.load_tensors(tmp_path, name)["w"], torch.full((3,), v))


@pytest.mark.parametrize("args, match", [
    (["--ema-decay", "2"], "--ema-decay must be in"), (["--label-dropout", "5"], "--label-dropout must be in"),
    (["--steps", "-1"], "--steps must be at least 1"), (["--save-every", "0"], "--save-every must be at least 1"),
    (["--warmup", "-3"], "--warmup must be >= 0"), (["--data", "/nonexistent/fmnist"], "lacks train-images")])
def test_train_command_line_is_checked_before_any_work(args, match, tmp_path):
    """Issue 20 F16: each bad option is an error naming it, before any data is read or checkpoint written."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--model", "fmnist-small",
                        "--out", str(tmp_path / "run"), *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and match in r.stderr and not (tmp_path / "run").exists(), r.stderr[-500:]


def test_learning_rate_schedule_and_guard():
    from fastsample.training import LossGuard, lr_at

    kw = dict(lr=1e-3, total=1100, warmup=100, phase_start=100, warm_from=100, final=0.1)
    assert lr_at(100, **kw) == pytest.approx(1e-5)  # the first warmup step
    assert lr_at(1099, **{**kw, "warmup": 0}) == pytest.approx(1e-4, rel=1e-4)  # cosine down to 10%
    assert lr_at(600, **{**kw, "warmup": 0}) == pytest.approx(0.55e-3)  # half way: the mean of 1 and 0.1
    assert lr_at(600, **{**kw, "warmup": 0, "schedule": "linear"}) == pytest.approx(0.55e-3)
    assert lr_at(600, **{**kw, "schedule": "constant"}) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_at(0, lr=1e-3, total=10, schedule="step")
    with pytest.raises(ValueError, match="total steps .10. must exceed the phase's first step .10."):
        lr_at(10, lr=1e-3, total=10, phase_start=10)
    guard = LossGuard(factor=10)
    assert guard.check([1.0] * 50) is None and guard.check([2.0] * 50) is None
    assert "diverged" in guard.check([30.0] * 50)
    assert "not finite" in guard.check([1.0, float("nan")])


def test_restart_from_ema_loads_the_ema_weights_and_no_moments(tmp_path):
    """--restart-from-ema (a new training phase): the network takes the checkpoint's EMA weights, AdamW starts fresh;
    a plain resume takes the raw weights and the saved moments."""
    from types import SimpleNamespace

    from fastsample.commands import train

    def fresh(seed):
        torch.manual_seed(seed)
        model = zoo.build("fmnist-small")
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), {k: v.detach().clone()
                                                                       for k, v in model.named_parameters()}

    model, opt, _ = fresh(0)
    model(torch.randn(2, 1, 32, 32), torch.tensor([10, 500])).sample.square().mean().backward()
    opt.step()
    ema = {k: v.detach().clone() + 0.5 for k, v in model.named_parameters()}
    args = SimpleNamespace(model="fmnist-small", batch_size=4, lr=1e-3, seed=0, ema_decay=0.999, weighting="edm",
                           lr_schedule="cosine", lr_final=0.05, warmup=10, steps=20)
    train.save(tmp_path, model, ema, opt, 7, args, [0.1], {"phase_start": 0, "warm_from": 0})
    for from_ema in (False, True):
        other, other_opt, other_ema = fresh(1)
        step, phase = train.load(tmp_path, other, other_ema, other_opt, from_ema=from_ema)
        source = ema if from_ema else dict(model.named_parameters())
        assert step == 7 and bool(other_opt.state) is not from_ema
        assert phase == ({"phase_start": 7, "warm_from": 7} if from_ema else {"phase_start": 0, "warm_from": 0})
        assert all(torch.equal(p, source[k]) for k, p in other.named_parameters())
        assert all(torch.equal(other_ema[k], ema[k]) for k in ema)
        if not from_ema:
            assert int(next(iter(other_opt.state.values()))["step"]) == 1  # AdamW's own count, not the step


def test_distillation_targets_the_teachers_prediction(tiny_dataset, tmp_path):
    """--distill-from: the target is the frozen teacher's noise prediction at the batch's noisy images, so a student
    that is its teacher's copy has zero loss and gradient; the run records the teacher; a bad teacher is refused."""
    import copy
    from types import SimpleNamespace

    from fastsample.commands import train
    from fastsample.data import load_fashion_mnist
    from fastsample.schedules import make_betas

    torch.manual_seed(0)
    student = zoo.build("fmnist-small")
    teacher = copy.deepcopy(student).requires_grad_(False)
    args = SimpleNamespace(model="fmnist-small", batch_size=4, lr=1e-3, seed=0, weighting="edm", label_dropout=0.1,
                           lr_schedule="cosine", lr_final=0.05, warmup=0, steps=10)
    images, labels = load_fashion_mnist("train", tiny_dataset)
    abar = torch.cumprod(1 - make_betas(), 0)
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, backward=lambda l: l.backward(),
                          clip_grad_norm_=torch.nn.utils.clip_grad_norm_)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    phase = {"phase_start": 0, "warm_from": 0}
    loss, _ = train._optimiser_step(args, 0, acc, student, student, opt, (images, labels, abar), phase, teacher)
    assert float(loss) == 0.0 and all(p.grad is None or not p.grad.any() for p in student.parameters())
    loss, _ = train._optimiser_step(args, 0, acc, student, student, opt, (images, labels, abar), phase)
    assert float(loss) > 0.1  # against the drawn noise the same batch has an error
    r = _train(tiny_dataset, tmp_path / "d", 2, "--distill-from", "fmnist-large")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "d" / "state.json").read_text())["distill_from"] == "fmnist-large"
    r = _train(tiny_dataset, tmp_path / "e", 2, "--distill-from", "fmnist-cond")
    assert r.returncode == 2 and "--distill-from must be another zoo model with the same class conditioning" in r.stderr


def blobs(n, seed, shift=0.0):
    """Garment-like test images: a bright blob of random size and place on a dark background."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    c = 16 + 4 * torch.randn(n, 2, 1, 1, generator=g)
    r = 5 + 3 * torch.rand(n, 1, 1, generator=g)
    d = ((ys - c[:, 0]) ** 2 + (xs - c[:, 1]) ** 2).sqrt()
    return (torch.tanh((r - d) * 0.8)[:, None] + shift).clamp(-1, 1)


def test_fid_self_near_zero_and_shifted_clearly_above():
    """On the shipped feature network, through clean-fid: a set against itself ~ 0, against other draws of the same
    distribution small, against a brightened copy clearly above."""
    ext = feature_extractor("fmnist")
    base, other, shifted = blobs(600, 1), blobs(600, 2), blobs(600, 1, shift=0.6)
    assert abs(fid_between(base, base, extractor=ext)) < 1e-6
    f_same, f_shift = fid_between(base, other, extractor=ext), fid_between(base, shifted, extractor=ext)
    assert f_shift > 10 * f_same and f_shift > 1.0, (f_same, f_shift)


def test_frechet_distance_closed_forms():
    """Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2 exactly; full covariances: symmetric in its
    arguments, 0 on itself, and tr sqrt(S1 S2) equal to the trace of the principal root computed by eigendecomposition."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet((mu1, np.diag(a)), (mu2, np.diag(b))) == pytest.approx(exact, rel=1e-12)
    m1, m2 = rng.normal(size=(7, 30)), rng.normal(size=(7, 30))
    s1, s2 = m1 @ m1.T / 30, m2 @ m2.T / 30
    assert frechet((mu1, s1), (mu2, s2)) == pytest.approx(frechet((mu2, s2), (mu1, s1)), rel=1e-10)
    assert abs(frechet((mu1, s1), (mu1, s1))) < 1e-9
    w, v = np.linalg.eig(s1 @ s2)  # real positive spectrum: S1 S2 is similar to a PSD matrix
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(w.real).sum()
    assert frechet((mu1, s1), (mu2, s2)) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="stats1 and stats2 must have the same shapes"):
        frechet((mu1, s1), (mu2[:3], s2[:3, :3]))


def test_fid_of_png_folders_equals_the_tensor_path(tmp_path):
    """clean-fid reading 8-bit PNGs with its own loader and resizer gives the FID of the tensor path (which quantises
    the same)."""
    a, b = blobs(300, 3), blobs(300, 4, shift=0.3)
    by_folder = fid_folders(save_pngs(a, tmp_path / "a"), save_pngs(b, tmp_path / "b"))
    assert by_folder == pytest.approx(fid_between(a, b), rel=1e-6, abs=1e-8)


def test_features_are_the_network_on_8bit_pixels():
    net = FeatureNet.load()
    x = blobs(40, 5)
    direct = extract(net, ((x + 1) * 127.5).round() / 127.5 - 1)
    assert np.allclose(features(x, extractor=CleanFIDExtractor(net)), direct.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="feature must be one of"):
        feature_extractor("clip")
    with pytest.raises(ValueError, match="images must be N x 1 x 32 x 32"):
        features(torch.zeros(2, 3, 32, 32), extractor=CleanFIDExtractor(net))


def test_shipped_feature_network_accuracy():
    cfg = json.loads((ROOT / "fastsample" / "models" / "fmnist-features" / "config.json").read_text())
    assert cfg["test_accuracy"] >= 0.90


def test_reference_statistics_are_cached(tmp_path):
    ext = CleanFIDExtractor(FeatureNet().eval())
    imgs = torch.rand(50, 1, 32, 32) * 2 - 1
    mu, sigma = reference_statistics(imgs, extractor=ext, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    mu2, sigma2 = reference_statistics(imgs, extractor=ext, cache_dir=tmp_path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    assert fid(imgs, reference=imgs, extractor=ext) == pytest.approx(0.0, abs=1e-6)


def test_trajectory_error_and_class_accuracy():
    x = torch.randn(4, 3)
    assert trajectory_error(x, x) == 0 and trajectory_error(2 * x, x) == pytest.approx(1.0)
    net = FeatureNet().eval()
    imgs = ((torch.rand(20, 1, 32, 32) * 255).round() / 127.5 - 1)  # already 8-bit
    pred = extract(net, imgs, logits=True).argmax(1)
    assert class_accuracy(imgs, pred, net) == 1.0
    assert class_accuracy(imgs, (pred + 1) % 10, net) == 0.0
    with pytest.raises(ValueError, match="images must be N x 1 x 32 x 32"):
        extract(net, torch.zeros(2, 3, 32, 32))


def test_inception_features_or_a_clear_error():
    """Where clean-fid's Inception weights load, FID features are 2048-d; offline, a clear error names the fix."""
    try:
        ext = feature_extractor("inception")
    except RuntimeError as e:
        assert "Inception weights" in str(e) and "feature='fmnist'" in str(e)
        return
    assert features(blobs(4, 0), "inception", ext).shape == (4, 2048)


def test_feature_network_and_statistics_cache_are_validated(tmp_path):
    """Issue 20: a broken feature network or reference-statistics cache is an error that names the file."""
    import shutil

    from safetensors.torch import save_file

    from fastsample import metrics

    shutil.copytree(metrics.FEATURES_DIR, tmp_path / "net")
    (tmp_path / "net" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json: not a feature network config"):
        metrics.FeatureNet.load(tmp_path / "net")
    shutil.copy(metrics.FEATURES_DIR / "config.json", tmp_path / "net" / "config.json")
    weights = {k: v.clone() for k, v in metrics.FeatureNet.load().state_dict().items()}
    first = next(iter(weights))
    weights[first].fill_(float("nan"))
    save_file(weights, str(tmp_path / "net" / "model.safetensors"))
    with pytest.raises(ValueError, match="non-finite weights"):
        metrics.FeatureNet.load(tmp_path / "net")
    images = torch.zeros(4, 1, 32, 32)
    net = metrics.FeatureNet.load()
    key = metrics.tensor_digest(images, *net.state_dict().values())
    save_file({"mu": torch.zeros(3)}, str(tmp_path / f"fmnist-{key}.safetensors"))
    with pytest.raises(ValueError, match="broken reference-statistics cache"):
        metrics.reference_statistics(images, extractor=net, cache_dir=tmp_path)
