import importlib.util
from pathlib import Path

import torch
import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(name):
    """The module of scripts/<name>.py or experiments/<name>.py (their main(argv) runs in the test's process)."""
    path = next(p for p in (ROOT / "scripts" / f"{name}.py", ROOT / "experiments" / f"{name}.py") if p.is_file())
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smooth_model(x, t, **kwargs):
    """A smooth, deterministic stand-in network: any output type, any timestep convention."""
    t = float(t)
    return torch.tanh(x) * (t / 1000 + 0.3) + 0.1 * torch.sin(3 * x)


def run_loop(scheduler, x, n=None, model=smooth_model, generator_seed=None, pass_generator=True, **set_kw):
    if n is not None:
        set_kw["num_inference_steps"] = n
    scheduler.set_timesteps(**set_kw)
    g = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    for t in scheduler.timesteps:
        kw = {"generator": g} if pass_generator else {}
        x = scheduler.step(model(x, t), t, x, **kw).prev_sample
    return x


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def latents():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is several times faster than two (no OpenMP spin/sync).  A module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
