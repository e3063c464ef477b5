"""The solver registry: a new solver is one registered class.  A toy solver (the first-order exponential Euler
step in lambda, in data form) registered here, with no other edit anywhere, is a scheduler by name, a sweep row, a
command-line choice, and passes the convergence and contract checks that every registered solver runs."""
import math

import pytest
import torch

from fastsample import registry
from fastsample.solver import Rule, Solver
from fastsample.solvers import DPMSolverPlusPlusScheduler


class EulerLambda(Solver):
    """x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0: DDIM, exact for a constant data prediction."""

    name = "euler-lambda"
    prediction = "x0"

    def rule(self, grid, i, k):
        a, s, a1, s1 = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
        if s1 == 0:
            return Rule(0.0, (a1,))
        return Rule(s1 / s, (a1 - a * s1 / s,))


class EulerLambdaScheduler(DPMSolverPlusPlusScheduler):  # the config keys of DPM-Solver++, its own rule
    def make_solver(self):
        return EulerLambda(1)


@pytest.fixture
def toy():
    info = registry.register("euler-lambda", EulerLambdaScheduler,
                             variants=[registry.Variant("euler-lambda1", {}, order=1)])
    yield info
    registry.unregister("euler-lambda")


def test_a_registered_solver_is_everywhere(toy):
    from fastsample import make_scheduler, sweep

    assert type(make_scheduler("euler-lambda")) is EulerLambdaScheduler
    assert "euler-lambda1" in sweep.schedulers() and "euler-lambda1" in sweep.ours()
    assert sweep.make_named_scheduler("euler-lambda1").solver.name == "euler-lambda"
    assert "euler-lambda" in registry.all_names()  # the scripts' --scheduler choices
    from fastsample.commands import sample as sample_command

    assert "euler-lambda" in sample_command.scheduler_choices()


def test_a_registered_solver_passes_the_convergence_and_contract_checks(toy, latents):
    from test_contract import test_dtype_in_dtype_out, test_reuse_gives_identical_results, test_save_load_round_trip
    from test_convergence import SCHEDULES, measured_order, solvers

    from fastsample.testbeds import GaussianMixture

    for key, (schedule, t0, t1) in SCHEDULES.items():
        gm = GaussianMixture.random(dim=4, components=3, seed=1, schedule=schedule)
        (a0, s0), (a1, s1) = [tuple(float(v) for v in schedule.alpha_sigma(torch.tensor(t))) for t in (t0, t1)]
        x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(
            4 * a0 ** 2 + s0 ** 2)
        problem = (key, schedule, gm, x_T, gm.exact_solution(x_T, s0 / a0, s1 / a1, a0, a1),
                   float(schedule.lam(torch.tensor(t0))), float(schedule.lam(torch.tensor(t1))))
        solver, order = solvers(schedule)["euler-lambda1"]  # the convergence test's own list picks it up
        assert abs(measured_order(problem, "euler-lambda1", solver, order) - 1) < 0.3
    test_reuse_gives_identical_results(EulerLambdaScheduler, latents)
    test_dtype_in_dtype_out(EulerLambdaScheduler, torch.float32, latents)
    test_save_load_round_trip(EulerLambdaScheduler, __import__("pathlib").Path(__import__("tempfile").mkdtemp()), latents)


def test_names_are_one_namespace():
    with pytest.raises(ValueError, match=r"already registered"):
        registry.register("unipc3", EulerLambdaScheduler)
    with pytest.raises(TypeError, match="FastScheduler subclass"):
        registry.register("toy", object)
    with pytest.raises(ValueError, match="scheduler name must be one of"):
        registry.make_scheduler("heun-9")
