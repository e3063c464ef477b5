"""Every registered solver in k-diffusion's calling convention, the one ComfyUI, Forge and A1111 call samplers in:

    sample_X(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x

``model(x, sigma, **extra_args)`` returns the denoised image; ``sigmas`` is a descending 1-D tensor, usually ending
in 0; ``callback`` gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per model call of a step.

The solvers run on the grid the sigmas define, in the model's own parameterization (``model_type``):
- ``"ve"`` (default): x = x0 + sigma * eps, k-diffusion's convention for every model, VP ones included (its
  wrappers feed a VP network x / alpha);
- ``"const"``: ComfyUI's CONST convention for flow models, x = (1 - sigma) x0 + sigma eps, sigma in [0, 1].
  The exponential integrators then use the flow's own log-SNR log((1 - sigma) / sigma). k-diffusion's
  formulas, which ComfyUI also uses for flow models, treat it as VE.

``sample(name, ...)`` takes any registered scheduler name (``fastsample.registry``) and its config options as
keywords (``solver_order``, ``eta``, ``solver_type``, ``dc_ratios``, ``cpr``, ...), plus ``s_noise``,
``noise_sampler`` (k-diffusion's: ``noise_sampler(sigma, sigma_next)`` returns standard normal noise) and
``scales`` (a learned schedule's per-step prediction scales). ``sample_<name>`` functions exist for every name, and
``sample_euler``, ``sample_heun``, ``sample_dpmpp_2m``, ``sample_dpmpp_2m_sde`` and ``sample_dpmpp_3m_sde`` equal
k-diffusion's functions of the same name, and ``sample_dpm_adaptive`` takes its signature (``fastsample.adaptive``). ``learned_sigmas`` turns a learned schedule into the sigmas to pass.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm, trange

from .noise import BrownianTree
from .parameterization import convert
from .registry import all_names, lookup
from .schedules import VE, RectifiedFlow
from .driver import drive
from .solver import Grid
from .timesteps import check_choice, check_descending, check_scales

MODEL_TYPES = ("ve", "const")


def import_k_diffusion_sampling():
    """k-diffusion's own ``k_diffusion.sampling`` module, imported alone (the package's ``__init__`` imports
    training extras such as wandb and clip that a sampling user need not install), or None when k-diffusion is not
    installed (``pip install --no-deps k-diffusion torchdiffeq``).  For comparisons against the reference."""
    import importlib
    import importlib.util
    import sys
    import types

    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("k_diffusion", package)
    return importlib.import_module("k_diffusion.sampling")


def grid_from_sigmas(sigmas, model_type: str = "ve") -> Grid:
    """The N+1 levels of ``sigmas`` (descending; a trailing 0 is the clean end point) as a solver grid: alpha = 1
    for "ve", alpha = 1 - sigma for "const"."""
    check_choice("model_type", model_type, MODEL_TYPES)
    s = check_descending("sigmas", sigmas)
    if s.size < 2:
        raise ValueError(f"sigmas must hold at least two levels (one step), got {s.tolist()}")
    if model_type == "const" and s[0] > 1:
        raise ValueError(f"CONST (flow) sigmas must lie in [0, 1], got {s.tolist()}")
    alpha = [1.0] * len(s) if model_type == "ve" else [1.0 - float(v) for v in s]
    sigma = [float(v) for v in s]
    lam = [math.inf if sg == 0 else (-math.inf if a == 0 else math.log(a) - math.log(sg))
           for a, sg in zip(alpha, sigma)]
    return Grid(tuple(alpha), tuple(sigma), tuple(lam), tuple(sigma))


def default_noise_sampler(x: torch.Tensor, sigmas, seed: int | None = None):
    """A Brownian-tree noise sampler over sigma (as k-diffusion's default for its SDE samplers): the noise of a
    step depends only on the interval, so a seed gives consistent samples across step counts.  ``seed`` None
    draws one from torch's global generator."""
    positive = [float(v) for v in sigmas if float(v) > 0]
    lo, hi = min(positive), max(positive)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    if lo == hi:
        hi = lo * (1 + 1e-6)
    tree = BrownianTree(math.log(lo), math.log(hi), tuple(x.shape), [int(seed)])  # Brownian in tau = sigma

    def sample(sigma, sigma_next):
        a, b = (math.log(min(max(float(v), lo), hi)) for v in (sigma, sigma_next))
        return tree.increment(a, b).to(device=x.device, dtype=x.dtype)

    return sample


def _solver(name: str, model_type: str, lo: float, hi: float, options: dict):
    """(scheduler, its solver) for registered ``name`` with ``options``, on the schedule of levels [lo, hi] in the
    model type's own variables (DEIS integrates its coefficients in that schedule's time)."""
    info, variant = lookup(name)
    scheduler = info.make(**{**variant, **options})
    scheduler.schedule = VE(lo, hi) if model_type == "ve" else RectifiedFlow(t_min=lo, t_max=hi)
    return scheduler, scheduler.make_solver()


def sample(name: str, model, x: torch.Tensor, sigmas, extra_args=None, callback=None, disable=None,
           noise_sampler=None, s_noise: float = 1.0, scales=None, model_type: str = "ve", **options) -> torch.Tensor:
    """Integrate from ``x`` (noise at ``sigmas[0]``) along ``sigmas`` with the registered solver ``name``."""
    sig = sigmas.tolist() if torch.is_tensor(sigmas) else list(sigmas)
    grid = grid_from_sigmas(sig, model_type)
    n = grid.num_steps
    positive = [v for v in sig if v > 0]
    lo, hi = min(positive), max(positive)
    scheduler, solver = _solver(name, model_type, lo if lo < hi else hi / 2, hi, options)  # (one level: any range)
    if scales is not None:
        scales = check_scales(scales, n, "scales")
    if not (isinstance(s_noise, (int, float)) and math.isfinite(s_noise) and s_noise >= 0):
        raise ValueError(f"s_noise must be a finite number >= 0, got {s_noise!r}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    if noise_sampler is None and solver.stochastic:
        noise_sampler = default_noise_sampler(x, sig, extra_args.get("seed"))
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32

    def sigma_at(node):
        return sigmas[node] if torch.is_tensor(sigmas) else torch.tensor(sig[node])

    def call(x, node):
        return model(x, sigma_at(node) * s_in, **extra_args)

    def check(node, i, x, denoised, _state):
        if callback is not None and node == i:
            callback({"x": x, "i": i, "sigma": sigma_at(node), "sigma_hat": sigma_at(node), "denoised": denoised})
        if not math.isfinite(float(denoised.sum(dtype=torch.float64))):
            raise ValueError(f"the model's denoised output contains NaN or Inf at step {i} (sigma {sig[node]})")

    def noise(i):
        levels = (sigmas[i], sigmas[i + 1]) if torch.is_tensor(sigmas) else (sig[i], sig[i + 1])
        return noise_sampler(*levels).to(cdt) * s_noise

    # the denoised output is the data prediction ("sample"); scales multiply the solver's prediction, as the
    # schedulers apply learned_scales; DualFast and DC-Solver's ratios for n steps are the run's transforms
    x, _ = drive(solver, grid, x, call, "sample", scheduler.prediction_transforms(n), scales, noise=noise,
                 callback=check, dtype=cdt, progress=lambda calls: tqdm(calls, disable=disable))
    return x


def _named(name: str, doc: str, function_name: str | None = None, **defaults):
    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return sample(name, model, x, sigmas, extra_args, callback, disable, **{**defaults, **options})

    fn.__name__ = fn.__qualname__ = function_name or "sample_" + name.replace("-", "_").replace("+", "p")
    fn.__doc__ = doc
    return fn


# k-diffusion's own samplers, equal to them: first order where the next sigma is 0, no other lower-order steps
sample_euler = _named("ddim", "k-diffusion's sample_euler (s_churn = 0): DDIM, the first-order exponential "
                      "integrator, is Euler's method in sigma for a denoiser.", lower_order_final=False)
sample_dpmpp_2m = _named("dpm++2m", "k-diffusion's sample_dpmpp_2m: DPM-Solver++(2M).", lower_order_final=False)
sample_dpmpp_2m_sde = _named("sde-dpm++2m", "k-diffusion's sample_dpmpp_2m_sde (eta, s_noise, noise_sampler, "
                             "solver_type 'midpoint' or 'heun').", lower_order_final=False)
sample_dpmpp_3m_sde = _named("dpmsolver++", "k-diffusion's sample_dpmpp_3m_sde (eta, s_noise, noise_sampler): "
                             "DPM-Solver++(3M) SDE, its second step with phi_2 (solver_type 'heun').",
                             "sample_dpmpp_3m_sde", solver_order=3, solver_type="heun", algorithm_type="sde-dpmsolver++",
                             lower_order_final=False)



@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, model_type: str = "ve"):
    """EDM's second-order Heun sampler (Karras et al. 2022, Algorithm 2) with k-diffusion's options: the registered
    ``heun`` solver (solvers/heun.py), two model calls a step and one into sigma = 0.  ``s_churn`` > 0 first
    raises the level of each step with sigma in [s_tmin, s_tmax] by a factor 1 + min(s_churn / N, sqrt 2 - 1), with
    fresh noise from torch's global generator (drawn at every step, as k-diffusion does; VE only)."""
    levels = grid_from_sigmas(sigmas.tolist() if torch.is_tensor(sigmas) else list(sigmas), model_type).sigma
    if s_churn and model_type != "ve":
        raise ValueError(f"s_churn adds VE noise: it needs model_type='ve', got {model_type!r}")
    if not s_churn:
        return sample("heun", model, x, sigmas, extra_args, callback, disable, model_type=model_type)
    levels_t = torch.as_tensor(sigmas)
    n = len(levels) - 1
    churn = min(s_churn / n, math.sqrt(2) - 1)
    for i in trange(n, disable=disable):
        lifted = s_tmin <= levels[i] <= s_tmax
        z = torch.randn_like(x) * s_noise
        start = levels_t[i] * (1 + churn) if lifted else levels_t[i]
        if lifted:
            x = x + z * (start ** 2 - levels_t[i] ** 2).sqrt()
        step_callback = None if callback is None else (
            lambda d, i=i, s=start: callback({**d, "i": i, "sigma": levels_t[i], "sigma_hat": s}))
        x = sample("heun", model, x, torch.stack([start, levels_t[i + 1]]), extra_args, step_callback, True)
    return x


sample_er_sde = _named("er-sde3", "ComfyUI's sample_er_sde (s_noise, noise_sampler): ER-SDE-Solver-3 with the "
                       "default noise scale (solvers/er_sde.py).", "sample_er_sde", lower_order_final=False)
SAMPLERS = {fn.__name__: fn for fn in (sample_euler, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde,
                                       sample_er_sde, sample_heun)}
for _name in all_names():
    _fn = _named(_name, f"The registered solver {_name!r} (fastsample.registry) in k-diffusion's convention.")
    SAMPLERS.setdefault(_fn.__name__, _fn)
globals().update(SAMPLERS)


def __getattr__(attr: str):
    """``sample_<name>`` for a solver registered after this module was imported (a plug-in's ``register`` call)."""
    for name in all_names():
        fn = _named(name, f"The registered solver {name!r} (fastsample.registry) in k-diffusion's convention.")
        if fn.__name__ == attr:
            return fn
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None,
                        rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, solver: str = "unipc3",
                        return_info: bool = False, model_type: str = "ve", max_steps: int = 10_000, **options):
    """Adaptive step size from ``sigma_max`` to ``sigma_min`` (k-diffusion's ``sample_dpm_adaptive`` signature),
    with a registered multistep ``solver`` and its embedded lower-order pair (``fastsample.adaptive``): a rejected
    step costs no model call.  Returns x at ``sigma_min`` (and, with ``return_info``, a dict with "nfe",
    "n_accept", "n_reject" and the accepted "sigmas")."""
    from .adaptive import solve_adaptive

    check_choice("model_type", model_type, MODEL_TYPES)
    lo, hi = float(sigma_min), float(sigma_max)
    if not 0 < lo < hi or (model_type == "const" and hi >= 1):
        raise ValueError(f"need 0 < sigma_min < sigma_max{' < 1' if model_type == 'const' else ''}, got "
                         f"sigma_min={lo}, sigma_max={hi}")
    if lookup(solver)[0].takes("lower_order_final"):  # every adaptive step is a "last" step of its grid
        options = {**options, "lower_order_final": False}
    sch, engine = _solver(solver, model_type, lo, hi, options)
    to_ve = (lambda s: s) if model_type == "ve" else (lambda s: s / (1 - s))  # CONST: sigma_ve = s / (1 - s)
    kw = {} if extra_args is None else extra_args
    ones = x.new_ones([x.shape[0]])
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    bar = trange(0, disable=disable)

    def predict(y, grid, i):
        level = grid.sigma[i]
        denoised = model(y.to(x.dtype), torch.as_tensor(level, dtype=x.dtype) * ones, **kw).to(cdt)
        if callback is not None:
            callback({"x": y, "i": i, "sigma": level, "sigma_hat": level, "denoised": denoised})
        bar.update(1)
        return convert(denoised, y, "sample", grid.alpha[i], grid.sigma[i], engine.prediction)

    y, info = solve_adaptive(predict, x.to(cdt), engine, sch.schedule, to_ve(hi), to_ve(lo), rtol, atol, h_init,
                             max_steps)
    bar.close()
    y = y.to(x.dtype)
    if return_info:
        return y, {"nfe": info.nfe, "n_accept": info.accepted, "n_reject": info.rejected,
                   "sigmas": [s if model_type == "ve" else s / (1 + s) for s in info.sigmas]}
    return y


SAMPLERS[sample_dpm_adaptive.__name__] = sample_dpm_adaptive


def learned_sigmas(schedule) -> torch.Tensor:
    """A learned schedule's levels as k-diffusion sigmas (the last one its end point): they are in its scheduler's
    units already, VE sigmas for a VP model's schedule and flow sigmas for a flow model's.  Its ``scales`` go to
    ``sample(..., scales=...)``."""
    return torch.tensor([float(v) for v in schedule.sigmas], dtype=torch.float64)
