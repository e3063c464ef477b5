"""docs/extending.md's example solver, run as written: registered by its one file, it is a scheduler by name, a sweep
row and a k-diffusion function, and converges at the orders its variants declare."""
import re
import types
from pathlib import Path

import pytest
import torch

from fastsample import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def example():
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType("exp_adams_example")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    yield module
    registry.unregister("exp-adams")


def test_the_example_is_everywhere(example):
    from fastsample import k_diffusion, make_scheduler, sweep

    assert type(make_scheduler("exp-adams3")) is example.ExpAdamsScheduler
    assert {"exp-adams2", "exp-adams3"} <= set(sweep.schedulers())
    assert callable(k_diffusion.sample_exp_adams3)
    s = make_scheduler("exp-adams3")
    s.set_timesteps(8)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps:
        x = s.step(0.1 * x, t, x).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("kind", ["vp", "ve", "flow"])
def test_the_example_converges_at_its_declared_orders(example, kind):
    import math

    from test_convergence import SCHEDULES, measured_order

    from fastsample.registry import solver_on, variants
    from fastsample.testbeds import GaussianMixture

    schedule, t0, t1 = SCHEDULES[kind]
    gm = GaussianMixture.random(dim=4, components=3, seed=1, schedule=schedule)
    (a0, s0), (a1, s1) = [tuple(float(v) for v in schedule.alpha_sigma(torch.tensor(t))) for t in (t0, t1)]
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(4 * a0 ** 2 + s0 ** 2)
    exact = gm.exact_solution(x_T, s0 / a0, s1 / a1, a0, a1)
    lams = [float(schedule.lam(torch.tensor(t))) for t in (t0, t1)]
    problem = (kind, schedule, gm, x_T, exact, *lams)
    for name in ("exp-adams2", "exp-adams3"):
        measured_order(problem, name, solver_on(schedule, name), variants()[name][1].order)
