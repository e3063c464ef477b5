"""BDIA-DDIM (bi-directional integration approximation, arXiv 2307.10829): an exactly invertible DDIM.

With Phi(x_i -> j) = (sigma_j / sigma_i) x_i + (alpha_j - alpha_i sigma_j / sigma_i) D_i the DDIM step from node i
to node j through the data prediction D_i = D(x_i), the update from node i (i >= 1) is
    x_{i+1} = gamma (x_{i-1} - Phi(x_i -> i-1)) + Phi(x_i -> i+1):
the forward DDIM step to the next level, plus gamma times the backward step's mismatch with the sample before (on
the variance-preserving state, so VE and flow grids give the same samples: ``BDIA.memory``).
gamma = 0 is DDIM; the first step (no sample before) is a DDIM step.  Each update is linear in (x_{i-1}, x_i, D_i), so
x_{i-1} = (x_{i+1} - Phi(x_i -> i+1)) / gamma + Phi(x_i -> i-1) recovers the past exactly from the two newest samples
(``invert``): one model call a step either way.  The authors' repository recommends gamma 0.5 at 10 steps and 1.0 at
40 for sampling, and gamma in [0.92, 1] for editing.  Inverting divides by gamma at every step, so the inverted
latents grow like gamma^-N along the sampler's unstable mode: for editing take gamma near 1.

``base="heun"`` wraps EDM's second-order sampler (Heun; the paper applies BDIA to EDM's sampling too): the forward
step is Heun's (two model calls, the second at DDIM's first-stage sample), and the backward step is made second
order from the same two predictions (``BDIA.stage_coefficient``).  With DDIM's first-order backward step the
carried mismatch would be O(h^2) a step and the method first order; the paper's own backward rule for EDM was not
readable here, so this one is ours, chosen so that BDIA keeps the base's order.  Both stages depend on x_i alone:
the inverse needs the same two calls a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from fastsample.expint import combine
from fastsample.solver import Grid, Solver
from fastsample.timesteps import check_steps_offset
from fastsample.transforms import apply
from .heun import Heun


def _ddim(grid: Grid, i: int, j: int) -> tuple[float, float]:
    """(c_x, c_D) of the DDIM step from node i to node j: Phi = c_x x_i + c_D D_i."""
    r = grid.sigma[j] / grid.sigma[i]
    return r, grid.alpha[j] - grid.alpha[i] * r


def check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and 0 <= gamma <= 1):
        raise ValueError(f"gamma must be a number in [0, 1] (0: DDIM; > 0 to invert), got {gamma!r}")
    return float(gamma)


BASES = ("ddim", "heun")


def check_base(base) -> str:
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES} (the forward step BDIA wraps), got {base!r}")
    return base


class BDIA(Solver):
    name = "bdia"
    prediction = "x0"

    def __init__(self, gamma: float = 0.5, base: str = "ddim"):
        super().__init__(1)
        self.gamma = check_gamma(gamma)
        self.base = check_base(base)
        self._heun = Heun() if base == "heun" else None

    @property
    def order(self) -> int:
        """DDIM base: 1; gamma = 1 is the leapfrog (central) form, second order.  Heun base: 2 for every gamma (the
        backward step is second order too, so the mismatch it carries is O(h^3)).  Measured in
        tests/test_convergence.py."""
        return 2 if self.gamma == 1.0 or self.base == "heun" else 1

    def calls(self, grid: Grid) -> list[tuple[int, int]]:
        return self._heun.calls(grid) if self._heun is not None else super().calls(grid)

    def two_stages(self, grid: Grid, i: int) -> bool:
        """Whether step i makes a second model call (the Heun base, but into sigma = 0 and from pure noise)."""
        return self._heun is not None and self._heun._two_stages(grid, i)

    @staticmethod
    def first_stage(grid: Grid, i: int, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The sample of a two-stage step's second model call: DDIM's step from node i (the run and ``invert``
        compute it alike, so the model sees the same numbers)."""
        fx, fd = _ddim(grid, i, i + 1)
        return combine(fx, x, (fd,), (pred,))

    def memory(self, grid: Grid, i: int) -> float:
        """gamma k_i, the weight of the backward step's mismatch in x_{i+1}.  The update is defined on the variance-
        preserving state x / n (n = sqrt(alpha^2 + sigma^2), 1 on a VP grid), as the authors' DDIM is: the mismatch
        of node i - 1 reaches node i + 1 scaled by k_i = n_{i+1} / n_{i-1}.  So a VE (k-diffusion) or flow grid gives
        the same samples as the VP scheduler; DDIM's steps themselves do not depend on the parameterization."""
        norm = [math.hypot(grid.alpha[j], grid.sigma[j]) for j in (i - 1, i + 1)]
        return self.gamma * norm[1] / norm[0]

    def coefficients(self, grid: Grid, i: int, first: bool) -> tuple[float, float, float]:
        """(c_prev, c_x, c_D) of x_{i+1} = c_prev x_{i-1} + c_x x_i + c_D D_i (the DDIM base, and the Heun base's
        first stage: for a two-stage step ``stage_coefficient`` adds the second prediction's terms)."""
        fx, fd = _ddim(grid, i, i + 1)
        if first or self.gamma == 0.0:
            return 0.0, fx, fd
        bx, bd = _ddim(grid, i, i - 1)
        g = self.memory(grid, i)
        return g, fx - g * bx, fd - g * bd

    def stage_coefficient(self, grid: Grid, i: int, first: bool) -> float:
        """The Heun base's two-stage step: x_{i+1} = (the DDIM-base update) + c (D_i - D'), D' the prediction at the
        first stage's sample.  Heun's forward second stage adds c_f (D_i - D'); the backward step to node i - 1 is
        made second order from the same two slopes: in x_bar = x / alpha against rho = sigma / alpha, the slope's
        change over the forward interval (rho_{i+1} - rho_i) is (D_i - D') / rho_{i+1}, so the backward Taylor step
        over d_b = rho_{i-1} - rho_i adds alpha_{i-1} d_b^2 / (2 (rho_{i+1} - rho_i) rho_{i+1}) (D_i - D') to DDIM's
        backward step.  c = c_f - gamma k_i c_b; both stages depend on x_i alone, so the step stays invertible."""
        (c_f,) = self._heun.second_stage(grid, i).coefs[1:]
        if first or self.gamma == 0.0 or grid.alpha[i - 1] == 0.0:
            return c_f  # back to pure noise (flow sigma 1) the step in rho is infinite: DDIM's backward step alone
        rho = [grid.sigma[j] / grid.alpha[j] for j in (i - 1, i, i + 1)]
        d_f, d_b = rho[2] - rho[1], rho[0] - rho[1]
        c_b = grid.alpha[i - 1] * d_b ** 2 / (2 * d_f * rho[2])
        return c_f - self.memory(grid, i) * c_b

    def step(self, grid: Grid, state, x, pred, noise=None):
        i = state.index
        if i >= grid.num_steps:
            raise RuntimeError(f"step {i} is past the end of the {grid.num_steps}-step grid: call set_timesteps again")
        if state.stage:  # the Heun base's second call: x is the first stage's sample, pred D' there
            x_i, x_prev, d_i, partial = state.stage
            (pred,), memos = apply("prediction", state.transforms, state.memos, grid, i + 1, x, (pred,))
            c = self._cached(state, ("s", i, x_prev is None), lambda: self.stage_coefficient(grid, i, x_prev is None))
            x_next = combine(1.0, partial, (c, -c), (d_i, pred))
            return x_next, replace(state, index=i + 1, history=(pred,), orders=(2,), last_x=x_i, memos=memos,
                                   stage=())
        (pred,), memos = apply("prediction", state.transforms, state.memos, grid, i, x, (pred,))
        first = state.last_x is None
        cp, cx, cd = self._cached(state, ("b", i, first), lambda: self.coefficients(grid, i, first))
        x_next = combine(cx, x, (cd,), (pred,))
        if cp:
            x_next = x_next.add_(state.last_x, alpha=cp)
        if self.two_stages(grid, i):  # the model's next call is at the first stage's sample
            return self.first_stage(grid, i, x, pred), replace(state, memos=memos, stage=(x, state.last_x, pred, x_next))
        return x_next, replace(state, index=i + 1, history=(pred,), orders=(1,), last_x=x, memos=memos)

    def unstep(self, grid: Grid, i: int, x: torch.Tensor, x_next: torch.Tensor, pred: torch.Tensor,
               stage_pred: torch.Tensor | None = None) -> torch.Tensor:
        """The sample at node i - 1 from those at nodes i and i + 1, the data prediction at node i and, for the
        Heun base's two-stage steps, ``stage_pred``, the prediction at the first stage's sample."""
        if self.gamma == 0.0:
            raise ValueError("gamma = 0 is DDIM, which is not exactly invertible: use gamma > 0")
        two = self.two_stages(grid, i)
        if two != (stage_pred is not None):
            raise ValueError(f"step {i} has {'two stages: pass' if two else 'one stage: do not pass'} stage_pred")
        cp, cx, cd = self.coefficients(grid, i, first=False)
        out = x_next / cp - (cx / cp) * x - (cd / cp) * pred
        if two:
            c = self.stage_coefficient(grid, i, first=False)
            out = out - (c / cp) * (pred - stage_pred)
        return out


@dataclass(frozen=True)
class Inversion:
    """What regenerates an image exactly: the latents at the first grid node (``latents``, what a pipeline takes as
    ``latents=``) and at the second (``next_latents``), on the grid of ``num_inference_steps`` steps; ``exact``, the
    same two in the steps' compute dtype (float64 but on MPS), which the run continues from while its samples round
    to them."""
    latents: torch.Tensor
    next_latents: torch.Tensor
    num_inference_steps: int
    gamma: float
    base: str = "ddim"
    exact: tuple = ()


# ---------------------------------------------------------------------------- diffusers scheduler
from diffusers.configuration_utils import register_to_config  # noqa: E402

from fastsample.scheduler import FastScheduler, SchedulerMixin, shared_config  # noqa: E402,F401  (SchedulerMixin: pipeline reload)


class BDIAScheduler(FastScheduler):
    """Drop-in for diffusers' ``DDIMScheduler`` (its config keys; ``eta`` stays 0: BDIA is deterministic) with
    ``gamma`` (0 is DDIM); a FlowMatch config (``from_config``) or ``use_flow_sigmas`` gives it for flow models.
    ``clip_sample`` defaults to False (DDIM's default is True): a config without the key (FlowMatch's, the
    multistep schedulers') would otherwise clip latents to +-1 silently; configs that set it (SD's: false) keep it.
    After ``load_inversion(fastsample.invert(...))`` the next run with that step count regenerates the inverted
    image exactly: its first step returns the inversion's second latent (the model's outputs there are not used), and
    every later step is the exact inverse of an inversion step."""

    @register_to_config
    @shared_config(timestep_spacing="leading", final_sigmas_type=None)
    def __init__(self, clip_sample: bool = False, set_alpha_to_one: bool = True, clip_sample_range: float = 1.0,
                 gamma: float = 0.5, base: str = "ddim"):
        check_gamma(gamma)
        check_base(base)
        # model calls a step, as diffusers' HeunDiscreteScheduler says it for the pipelines' progress bars (the class
        # keeps DDIM's 1)
        self.order = 2 if base == "heun" else 1
        if not (isinstance(clip_sample_range, (int, float)) and 0 < clip_sample_range < math.inf):
            raise ValueError(f"clip_sample_range must be a positive finite number, got {clip_sample_range!r}")
        # DDIM's final alpha: 1 (set_alpha_to_one) is the clean end ("zero"), else the trained range's smallest level
        # ("sigma_min"); an explicit final_sigmas_type (the other schedulers' key) wins and sets set_alpha_to_one
        final_sigmas_type = self.config.final_sigmas_type
        if final_sigmas_type is None:
            final_sigmas_type = "zero" if set_alpha_to_one else "sigma_min"
        self.register_to_config(final_sigmas_type=final_sigmas_type, set_alpha_to_one=final_sigmas_type == "zero")
        self._inversion = None
        self._setup()

    keeps_exact_samples = True  # the float64 chain that invert retraces, whatever the pipeline's dtype

    def make_solver(self) -> Solver:
        return BDIA(self.config.gamma, self.config.base)

    def _discrete_timesteps(self, n: int) -> np.ndarray:
        """DDIMScheduler's spacings: "leading" is (0, 1, ..., n-1) T // n + steps_offset and "linspace" includes 0
        (the multistep schedulers' spacings put n + 1 points and drop the last); "trailing" is the same."""
        cfg, T = self.config, self.config.num_train_timesteps
        if self.spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + check_steps_offset(cfg.steps_offset)
        elif self.spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        else:
            return super()._discrete_timesteps(n)
        if ts[0] > T - 1:
            raise ValueError(f"steps_offset={cfg.steps_offset} with timestep_spacing='leading' and {n} steps puts the "
                             f"first timestep at {ts[0]}, beyond the last trained one ({T - 1}): steps_offset must be "
                             f"at most {max(T - 1 - (n - 1) * (T // n), 0)}")
        if ts[-1] == 0 and not cfg.set_alpha_to_one:
            raise ValueError("set_alpha_to_one=False with a last timestep of 0 makes DDIM's last step the identity "
                             "(from level 0 to level 0), which BDIA cannot take: use steps_offset=1 (as Stable "
                             "Diffusion's configs do) or set_alpha_to_one=True")
        return ts

    def _make_threshold(self):
        """DDIM's ``clip_sample`` (x0 clipped to +-clip_sample_range), or the dynamic thresholding: a function of the
        sample at the node alone, so the update stays exactly invertible."""
        cfg = self.config
        if cfg.get("clip_sample", False) and not cfg.get("thresholding", False):
            r = float(cfg.clip_sample_range)
            return lambda x0: x0.clamp(-r, r)
        return super()._make_threshold()

    def compute_dtype(self, sample: torch.Tensor) -> torch.dtype:
        """float64 wherever the device has it (not MPS): the last steps' backward DDIM coefficients (sigma_{i-1} /
        sigma_i ~ 36 into t = 0 on a 10-step grid) cancel, and float32 arithmetic there costs the round trip an
        order of magnitude (the testbed in float32, 10 steps: 1.6e-6 with float32 steps, 1.3e-7 with these)."""
        return torch.float32 if sample.device.type == "mps" else torch.float64

    def load_inversion(self, inversion: Inversion):
        """Arm the next run of ``inversion.num_inference_steps`` steps (it survives ``set_timesteps``) to regenerate
        the inverted image: its first sample must be ``inversion.latents``."""
        if not isinstance(inversion, Inversion):
            raise ValueError(f"load_inversion takes the Inversion that fastsample.invert returns, got {type(inversion).__name__}")
        if self.prediction_transforms(inversion.num_inference_steps):
            raise ValueError("dualfast mixes in a prediction from another sample, so a run with it is not the exact "
                             "inverse of the inversion: regenerate without dualfast")
        if inversion.gamma != self.config.gamma:
            raise ValueError(f"the inversion was made with gamma={inversion.gamma}, this scheduler has "
                             f"gamma={self.config.gamma}: regenerate with the same gamma")
        if inversion.base != self.config.base:
            raise ValueError(f"the inversion was made with base={inversion.base!r}, this scheduler has "
                             f"base={self.config.base!r}: regenerate with the same base")
        self._inversion = inversion

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        inv = self._inversion
        if inv is None:
            return super().step(model_output, timestep, sample, generator, return_dict, **kwargs)
        if self.num_inference_steps != inv.num_inference_steps:
            raise ValueError(f"the loaded inversion has {inv.num_inference_steps} steps, this run "
                             f"{self.num_inference_steps}: set_timesteps({inv.num_inference_steps})")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._calls[self._step_index][1] != 0:
            raise ValueError(f"a loaded inversion regenerates from the first step; this call is step "
                             f"{self._calls[self._step_index][1]} (a begin index, or load_inversion mid-run)")
        cdt = self.compute_dtype(sample)
        if self._step_index == 0:
            if sample.shape != inv.latents.shape or not torch.allclose(
                    sample.to(inv.latents), inv.latents.to(sample.device), rtol=1e-6, atol=1e-6):
                raise ValueError("the first sample of this run is not the loaded inversion's latents: pass "
                                 "latents=inversion.latents")
            # the float64 latents, used where the sample rounds to them
            self._exact = inv.exact[0].to(device=sample.device, dtype=cdt) if inv.exact else None
        # the call that ends the first step (the second with the Heun base's two stages) returns the second latent
        out = super().step(model_output, timestep, sample, generator, return_dict, **kwargs)
        if not self._ends_step(self._step_index - 1):
            return out  # the first stage of a two-stage first step: the model's next call is at its sample
        self._inversion = None  # the state is at node 1
        prev = inv.next_latents.to(device=sample.device, dtype=sample.dtype)
        self._exact = inv.exact[1].to(device=sample.device, dtype=cdt) if inv.exact else None
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def invert(model, x0: torch.Tensor, scheduler: BDIAScheduler, num_inference_steps: int, progress: bool = False,
           **model_kwargs) -> Inversion:
    """The BDIA inversion of ``x0`` (a clean sample, or latents for a latent model) on ``scheduler``'s grid of
    ``num_inference_steps`` steps: N model calls ``model(x, t, **model_kwargs)``, 2N - 2 on the Heun base (with the same kwargs and guidance
    as the regeneration will use).  The first inverse step, from x0 to the last noisy level, is DDIM's (its choice
    does not affect exactness); every other one is the exact inverse of a BDIA step.  Regenerate with
    ``scheduler.load_inversion(inv)`` and a run from ``inv.latents``."""
    from tqdm.auto import tqdm

    from fastsample.parameterization import convert
    from fastsample.sampling import model_output

    if not isinstance(scheduler, BDIAScheduler):
        raise ValueError(f"invert needs a BDIAScheduler (exact inversion), got {type(scheduler).__name__}")
    if scheduler.config.gamma == 0:
        raise ValueError("gamma = 0 is DDIM, which is not exactly invertible: use a BDIAScheduler with gamma > 0")
    scheduler.set_timesteps(num_inference_steps, device=x0.device)
    grid, solver, cfg = scheduler.grid, scheduler.solver, scheduler.config
    if scheduler.teleport_origin is not None or scheduler.scales is not None or scheduler.prediction_transforms(1):
        raise ValueError("invert takes a scheduler without teleportation, learned scales or dualfast (each step must "
                         "depend on its own sample alone)")
    n = grid.num_steps
    if n < 2:
        raise ValueError(f"num_inference_steps must be >= 2 to invert (two latents regenerate), got {num_inference_steps}")
    cdt = scheduler.compute_dtype(x0)
    ts = dict(zip((node for node, _ in solver.calls(grid)), scheduler.timesteps))  # the model's time at each node

    def predict(x, i, t=None):  # the data prediction at node i as the scheduler's step converts it; the model
        out = model_output(model(x.to(x0.dtype), ts[i] if t is None else t, **model_kwargs)).to(cdt)  # at ts[i]
        return convert(out, x, cfg.prediction_type, grid.alpha[i], grid.sigma[i], "x0", scheduler.threshold)

    x_end = x0.to(cdt)
    if grid.sigma[n] > 0:  # DDIM's backward step from the end level, the model called at the end level's time
        cx, cd = _ddim(grid, n, n - 1)
        x_prev = cx * x_end + cd * predict(x_end, n, torch.tensor(scheduler.model_time(grid)(n)))
    else:  # from clean data: x_{N-1} = alpha x0 + sigma eps(x0 at the last noisy level)
        eps = convert(model_output(model(x_end.to(x0.dtype), ts[n - 1], **model_kwargs)).to(cdt), x_end,
                      cfg.prediction_type, grid.alpha[n - 1], grid.sigma[n - 1], "eps")
        x_prev = grid.alpha[n - 1] * x_end + grid.sigma[n - 1] * eps
    # the samples at nodes i + 1 and i in the compute dtype, as the run keeps them (keeps_exact_samples); the model
    # sees them rounded to x0's dtype, as it does in the run
    later, x = x_end, x_prev
    for i in tqdm(range(n - 1, 0, -1), disable=not progress, leave=False):
        d, stage = predict(x, i), None
        if solver.two_stages(grid, i):  # the second call, at the first stage's sample
            stage = predict(solver.first_stage(grid, i, x, d), i + 1)
        later, x = x, solver.unstep(grid, i, x, later, d, stage)
    return Inversion(x.to(x0.dtype), later.to(x0.dtype), n, solver.gamma, solver.base, (x, later))


from fastsample.registry import Variant, register  # noqa: E402

register("bdia", BDIAScheduler, diffusers_peer="DDIMScheduler", peer_options={"gamma": 0.0},
         variants=[Variant("bdia05", {"gamma": 0.5}, 1),
                   # gamma = 1: x_{i+1} - x_{i-1} = Phi(x_i -> i+1) - Phi(x_i -> i-1), a central (leapfrog) step
                   Variant("bdia1", {"gamma": 1.0}, 2),
                   # on EDM's Heun, the backward step second order too: second order at every gamma
                   Variant("bdia-heun05", {"gamma": 0.5, "base": "heun"}, 2)])
