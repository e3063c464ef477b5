"""FastScheduler: the one generic diffusers adapter.  Solver files subclass it only to declare their config.

The adapter owns the noise schedule, the step grid and one explicit solver ``State``; it converts the model
output once (``driver.call_step``), computes in float32 (float64 for float64 samples) and casts back,
and tracks its position with a counter that ``set_timesteps`` resets.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .parameterization import check_prediction_type, dynamic_threshold
from .transforms import DualFast, dualfast_spec
from .timesteps import (FINAL_SIGMAS, FLOW_MATCH, SIGMA_SPACINGS, SPACINGS, TIMESTEP_SPACINGS, check_choice,
                        check_descending, check_flow_shift, check_num_steps, check_scales, discrete_timesteps,
                        flow_match_convert,
                        flow_match_sigmas, flow_sigmas, shift_flow, sigma_spacing, stretch_to_terminal)
from .noise import NOISE_TYPES, BrownianTree, seeds_from
from .schedules import F64, DiscreteVP, RectifiedFlow
from .driver import call_step
from .solver import Grid, Solver, check_coefficients, restarted

__all__ = ["FastScheduler", "SchedulerMixin", "SchedulerOutput", "shared_config"]


# FlowMatch options that no scheduler here implements: an error, never a silent change of the process
UNSUPPORTED_FLOW_MATCH_KEYS = {
    "invert_sigmas": "it integrates from sigma = 0 to 1 (Mochi's convention), which these solvers do not support",
    "stochastic_sampling": "it re-noises each Euler step; use DPMSolverPlusPlusScheduler with "
                           "algorithm_type='sde-dpmsolver++' for a stochastic flow sampler",
}


def is_flow_match_config(config) -> bool:
    """A config of one of diffusers' FlowMatch schedulers (by class name, or by FlowMatch's own ``shift`` key with
    none of the beta keys when the class name is absent)."""
    name = config.get("_class_name")
    if isinstance(name, str) and name:
        return name.startswith("FlowMatch")
    return "shift" in config and "beta_start" not in config and "use_flow_sigmas" not in config


def flow_match_config(config) -> dict:
    """Our keys for the flow schedule of a FlowMatch config: flow prediction, FlowMatch's grid (``spacing=
    "flow_match"``: its default levels, and custom ``sigmas`` and ``mu`` shifted as it shifts them), ``flow_shift``
    from ``shift``, and a final level of 0.  Every other key is kept, so a pipeline still reads FlowMatch's dynamic
    shifting keys (``base_shift``, ``max_image_seq_len``, ...) from the scheduler's config."""
    cfg = dict(config)
    for key, why in UNSUPPORTED_FLOW_MATCH_KEYS.items():
        if cfg.get(key):
            raise ValueError(f"the FlowMatch config sets {key}=True, which cannot be honoured: {why}")
    cfg.update(prediction_type="flow_prediction", spacing=FLOW_MATCH, flow_shift=cfg.get("shift", 1.0),
               final_sigmas_type="zero", use_flow_sigmas=False)
    # named, so that diffusers' from_config files FlowMatch's own keys as kept-but-unused, without a warning
    if not isinstance(cfg.get("_class_name"), str):
        cfg["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    return cfg


# The config keys every FastScheduler takes, declared once.  ``shared_config`` adds them to a subclass's ``__init__``
# signature, which is what diffusers' ``register_to_config`` and ``from_config`` read; they are read from
# ``self.config`` (``_setup``), which diffusers fills before the body runs, so the body does not name them.
# GRID_CONFIG: the noise schedule, the model's prediction and the step grid, under diffusers' names (first in the
# signature, as in diffusers'); a subclass may change a default (``@shared_config(timestep_spacing="leading")``).
GRID_CONFIG = (("num_train_timesteps", "int", 1000), ("beta_start", "float", 0.0001), ("beta_end", "float", 0.02),
               ("beta_schedule", "str", "linear"), ("trained_betas", "list | None", None),
               ("prediction_type", "str", "epsilon"), ("thresholding", "bool", False),
               ("dynamic_thresholding_ratio", "float", 0.995), ("sample_max_value", "float", 1.0),
               ("use_flow_sigmas", "bool", False), ("flow_shift", "float", 1.0), ("timestep_spacing", "str", "linspace"),
               ("steps_offset", "int", 0), ("final_sigmas_type", "str | None", "zero"),
               ("rescale_betas_zero_snr", "bool", False), ("spacing", "str | None", None))
# SHARED_CONFIG: the methods every scheduler offers: teleportation, learned schedules and DualFast (last).
SHARED_CONFIG = (("teleport_stats", "str | None", None), ("teleport_fraction", "float", 0.0),
                 ("teleport_sigma", "float | None", None), ("learned_timesteps", "list | None", None),
                 ("learned_scales", "list | None", None), ("learned_sigmas", "list | None", None),
                 ("learned_coefficients", "list | None", None),
                 ("dualfast", "float | dict | None", None))


def own_parameters(cls) -> list[inspect.Parameter]:
    """The keyword parameters a FastScheduler class declares itself: its ``__init__``'s, without the shared keys."""
    shared = {name for name, _, _ in GRID_CONFIG + SHARED_CONFIG}
    return [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self" and name not in shared]


def shared_config(init=None, *, like=None, **defaults):
    """Decorate a FastScheduler's ``__init__`` (under ``@register_to_config``) with the GRID_CONFIG keys before its
    own keyword parameters and the SHARED_CONFIG keys after them; the wrapped ``__init__`` receives only its own.
    ``@shared_config(key=value, ...)`` changes GRID_CONFIG defaults for this scheduler (its diffusers peer's).
    ``like=<FastScheduler class>``: this scheduler also takes that one's own keys (before its own; a key it declares
    itself keeps its own default), read from ``self.config`` as the shared ones."""
    if init is None:
        return functools.partial(shared_config, like=like, **defaults)
    grid = {name for name, _, _ in GRID_CONFIG}
    if unknown := sorted(set(defaults) - grid):
        raise TypeError(f"shared_config: {unknown} are not GRID_CONFIG keys (a scheduler's own keys go in its "
                        f"signature); the keys whose default it may change: {sorted(grid)}")
    sig = inspect.signature(init)
    first, *own = sig.parameters.values()
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    made = {name: inspect.Parameter(name, kind, default=defaults.get(name, default), annotation=hint)
            for name, hint, default in GRID_CONFIG + SHARED_CONFIG}
    if clash := sorted(set(made) & set(sig.parameters)):
        raise TypeError(f"{init.__qualname__} declares the shared config keys {clash} itself; drop them from it")
    mine = [p.name for p in own]
    borrowed = [p for p in own_parameters(like) if p.name not in mine] if like is not None else []
    new = sig.replace(parameters=[first, *(made[n] for n, _, _ in GRID_CONFIG), *borrowed, *own,
                                  *(made[n] for n, _, _ in SHARED_CONFIG)])

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = new.bind(self, *args, **kwargs).arguments
        return init(self, **{k: bound[k] for k in mine if k in bound})

    wrapper.__signature__ = new
    return wrapper


class FastScheduler(SchedulerMixin, ConfigMixin):
    """Base adapter.  Subclasses define ``__init__`` with ``@register_to_config`` over ``@shared_config`` (the keys
    every scheduler takes) and ``make_solver()``."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    # peer schedulers' option values that map onto ours, so that from_config between peers never raises
    _peer_values: dict = {}

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``; a FlowMatch scheduler's config (SD3, Flux, ...) becomes the same flow schedule
        in our keys (``flow_match_config``), and FlowMatch's keys stay in the config for the pipeline to read."""
        if config is not None and is_flow_match_config(config):
            config = flow_match_config(config)
        elif config is not None and "shift" in config:  # our own FlowMatch-named copy of flow_shift, set again below
            config = {k: v for k, v in dict(config).items() if k != "shift"}
        # the weights hash the fitted parts of the config (a learned schedule, DC ratios or CPR) were fitted to;
        # fastsample.sample warns on a mismatch
        fitted_to = (dict(config) if config is not None else {}).get("fitted_model_hash")
        if config is not None and "fitted_model_hash" in config:
            config = {k: v for k, v in dict(config).items() if k != "fitted_model_hash"}
        out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        model = out[0] if return_unused_kwargs else out
        if fitted_to is not None:
            fitted = [k for k in ("learned_timesteps", "learned_coefficients", "dc_ratios", "cpr")
                      if model.config.get(k) is not None]
            if not isinstance(fitted_to, str) or not fitted:
                raise ValueError(f"fitted_model_hash is the weights hash of what the config carries fitted (a "
                                 f"string, with learned_timesteps, learned_coefficients, dc_ratios or cpr), got "
                                 f"{fitted_to!r}")
            model.register_to_config(fitted_model_hash=fitted_to)
        if model.flow is not None:  # a stale FlowMatch ``shift`` from the source config must not win over ours
            model.register_to_config(shift=model.config.get("flow_shift", 1.0))
        return out

    # artefact files a config names; save_pretrained copies them into the folder and records them relative to it
    ARTEFACT_KEYS = {"teleport_stats": "teleport_stats.safetensors"}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False,
                        **kwargs):
        """diffusers' ``from_pretrained``; artefact paths in the config (``teleport_stats``) that are relative
        are resolved against the folder the config was read from, so a saved folder can be moved or shared."""
        import os

        config, kwargs = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, return_unused_kwargs=True,
                                         **kwargs)
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        for key in cls.ARTEFACT_KEYS:
            value = config.get(key)
            if isinstance(value, str) and not os.path.isabs(value) and folder.is_dir() and (folder / value).is_file():
                config[key] = str(folder / value)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """diffusers' ``save_pretrained``, with the config's artefact files copied into the folder and named
        relative to it: the folder is self-contained."""
        import shutil

        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        saved = {}
        from .zoo import ZOO_PREFIX, MODELS_DIR

        for key, name in self.ARTEFACT_KEYS.items():
            value = self.config.get(key)
            if isinstance(value, str) and Path(value).is_file() and Path(value).resolve().parent == MODELS_DIR:
                saved[key] = value  # a file the package ships: named, not copied
                self.register_to_config(**{key: ZOO_PREFIX + Path(value).name})
            elif isinstance(value, str) and Path(value).is_file():
                if Path(value).resolve() != (save_directory / name).resolve():
                    shutil.copyfile(value, save_directory / name)
                saved[key] = value
                self.register_to_config(**{key: name})
        try:
            super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            if saved:
                self.register_to_config(**saved)

    def make_solver(self) -> Solver:
        raise NotImplementedError

    def _remap_peer_values(self):
        for key, mapping in self._peer_values.items():
            value = self.config.get(key)
            if value in mapping:
                self.register_to_config(**{key: mapping[value]})

    def _setup(self):
        self._remap_peer_values()
        cfg = self.config
        check_prediction_type(cfg.prediction_type)
        check_choice("final_sigmas_type", cfg.final_sigmas_type, FINAL_SIGMAS)
        check_choice("noise_type", cfg.get("noise_type", "gaussian"), NOISE_TYPES)
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        self.spacing = self._resolve_spacing()
        if cfg.get("shift_terminal") is not None and not (cfg.use_flow_sigmas or self.spacing == FLOW_MATCH):
            raise ValueError(f"shift_terminal={cfg.shift_terminal} is only supported on a flow schedule "
                             f"(use_flow_sigmas=True or spacing='flow_match')")
        self.vp = DiscreteVP.from_betas_config(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                                               cfg.trained_betas, cfg.get("rescale_betas_zero_snr", False))
        betas = self.vp.betas
        self.flow = RectifiedFlow(t_min=0.0) if cfg.get("use_flow_sigmas", False) or self.spacing == FLOW_MATCH else None
        if self.flow is not None:
            check_flow_shift(cfg.get("flow_shift", 1.0), None, cfg.get("time_shift_type", "exponential"))
            # FlowMatch's name for the shift, so that FlowMatchEulerDiscreteScheduler.from_config(ours) keeps it
            self.register_to_config(shift=cfg.get("flow_shift", 1.0))
        for key in UNSUPPORTED_FLOW_MATCH_KEYS:
            if cfg.get(key):
                raise ValueError(f"{key}=True cannot be honoured by {type(self).__name__}: "
                                 f"{UNSUPPORTED_FLOW_MATCH_KEYS[key]}")
        self.schedule = self.flow or self.vp
        self.betas = betas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = self.vp.alphas_cumprod.float()
        self.init_noise_sigma = 1.0
        self.solver = self.make_solver()
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=np.float32))
        self.sigmas = torch.exp(self.vp.log_sigmas).float()
        self._grid: Grid | None = None
        self._scales = None
        self._state = None
        self._step_index = None
        self._begin_index = None
        self._tree = None
        self._exact = None
        self._restart_after_step = False
        self._threshold = self._make_threshold()
        dualfast_spec(cfg.get("dualfast"))  # a bad dualfast fails here, not at the first set_timesteps
        self._teleport = self._load_teleport()
        self._teleport_from = None  # (alpha, sigma) the teleported steps started from, once set_timesteps skips any

    def _load_teleport(self):
        """The config's teleportation: ``teleport_stats`` (a GaussianStats safetensors file) and where to jump to,
        ``teleport_fraction`` of the steps (in [0, 1)) or ``teleport_sigma`` (a level in the units of ``sigmas``)."""
        cfg = self.config
        path, frac, sig = cfg.get("teleport_stats"), cfg.get("teleport_fraction", 0.0), cfg.get("teleport_sigma")
        if not (isinstance(frac, (int, float)) and 0.0 <= frac < 1.0):
            raise ValueError(f"teleport_fraction must be in [0, 1), got {frac!r}")
        if sig is not None and not (isinstance(sig, (int, float)) and math.isfinite(sig) and sig > 0):
            raise ValueError(f"teleport_sigma must be a positive number, got {sig!r}")
        if sig is not None and frac:
            raise ValueError("pass teleport_fraction or teleport_sigma, not both")
        if (frac or sig is not None) and path is None:
            raise ValueError("teleport_fraction / teleport_sigma need teleport_stats (a GaussianStats file)")
        if path is None:
            return None
        from fastsample.solvers.teleport import GaussianStats

        from .zoo import resolve_artefact

        return GaussianStats.load(resolve_artefact(path))

    def _teleport_skip(self, grid: Grid) -> int:
        """How many leading steps of ``grid`` teleportation replaces (at least one step is left)."""
        cfg = self.config
        if self._teleport is None:
            return 0
        if cfg.get("teleport_sigma") is not None:
            levels = self.sigmas.tolist()
            k = next((j for j, v in enumerate(levels) if v <= cfg.teleport_sigma), grid.num_steps)
        else:
            k = round(cfg.teleport_fraction * grid.num_steps)
        return min(k, grid.num_steps - 1)

    @property
    def grid(self) -> Grid | None:
        """The current run's levels (float64 alpha, sigma, lambda, native time), set by ``set_timesteps``; None
        before it."""
        return self._grid

    @property
    def threshold(self):
        """The config's dynamic thresholding of the data prediction (a callable), or None."""
        return self._threshold

    @property
    def scales(self) -> list | None:
        """The current run's per-step prediction scales (a learned schedule's ``learned_scales``), or None."""
        return self._scales

    def prediction_transforms(self, n: int) -> tuple:
        """The transforms (``fastsample.transforms``) of an ``n``-step run, in order: the config's ``dualfast``
        (a coefficient c, or a dict ``{"c", "reference", "schedule"}``); DC-Solver adds its compensation."""
        spec = dualfast_spec(self.config.get("dualfast"))
        return () if spec is None else (DualFast(prediction=self.solver.prediction, **spec),)

    def sigma_bounds(self) -> tuple[float, float]:
        """The VE sigma range the sigma spacings span: config ``sigma_min`` / ``sigma_max`` where set, else the
        trained range."""
        return self._sigma_bounds()

    @property
    def teleport_origin(self) -> tuple[float, float] | None:
        """``(alpha, sigma)`` of the full schedule's first level, which teleportation starts from; None when the
        current schedule skips no step."""
        return self._teleport_from

    def prepare_latents(self, noise: torch.Tensor, num_inference_steps: int | None = None) -> torch.Tensor:
        """The starting latent for this scheduler: ``noise`` (x init_noise_sigma) moved in closed form, with no model
        call, to the first level of the teleported schedule; ``noise`` itself when teleportation is off.  Pass
        ``num_inference_steps`` to call ``set_timesteps`` first; a pipeline's own ``set_timesteps`` with the same
        count keeps the same schedule: ``pipe(..., num_inference_steps=n, latents=sch.prepare_latents(noise, n))``."""
        if num_inference_steps is not None:
            self.set_timesteps(num_inference_steps)
        x = noise * self.init_noise_sigma
        if self._teleport is None or self._teleport_from is None:
            return x
        if self._grid is None:
            raise RuntimeError("call set_timesteps() (or pass num_inference_steps) before prepare_latents")
        (a0, s0), (a1, s1) = self._teleport_from, (self._grid.alpha[0], self._grid.sigma[0])
        return self._teleport.teleport(x, a0, s0, a1, s1)

    def restart_history(self):
        """Forget the multistep history (the next step is first order, with no corrector): T-Stitch's option when
        the model changes mid-trajectory.  Called between the calls of a staged step (Heun's second stage), it takes
        effect when that step ends: the step's first stage stays the step's."""
        if self._state is None:
            return
        i = self._step_index
        if i is not None and i < len(self._calls) and self._calls[i][0] != self._calls[i][1]:
            self._restart_after_step = True
            return
        self._state = restarted(self._state)

    def _resolve_spacing(self) -> str:
        """diffusers' booleans (use_karras_sigmas, ...) and our one-string ``spacing`` resolve to one spacing."""
        cfg = self.config
        flags = {"karras": cfg.get("use_karras_sigmas", False), "exponential": cfg.get("use_exponential_sigmas", False),
                 "beta": cfg.get("use_beta_sigmas", False), "logsnr": cfg.get("use_lu_lambdas", False)}
        chosen = [k for k, v in flags.items() if v]
        if len(chosen) > 1:
            raise ValueError(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, use_lu_lambdas may be set, got {chosen}")
        spacing = cfg.get("spacing")
        self._flow_respacing = None
        if spacing == FLOW_MATCH:  # FlowMatch's flags respace its shifted levels (flow_match_convert)
            if chosen and chosen[0] not in ("karras", "exponential", "beta"):
                raise ValueError(f"spacing='flow_match' takes use_karras_sigmas, use_exponential_sigmas or "
                                 f"use_beta_sigmas, not use_{chosen[0]}")
            self._flow_respacing = chosen[0] if chosen else None
            return spacing
        if spacing is not None:
            check_choice("spacing", spacing, SPACINGS)
            if chosen and chosen[0] != spacing:
                raise ValueError(f"spacing={spacing!r} conflicts with the use_{chosen[0]} flag")
            return spacing
        return chosen[0] if chosen else cfg.timestep_spacing

    # ------------------------------------------------------------------ diffusers contract
    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
            raise ValueError(f"begin_index must be a non-negative int, got {begin_index!r}")
        self._begin_index = int(begin_index)

    def __len__(self):
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    @property
    def model_outputs(self) -> list:
        hist = list(reversed(self._state.history)) if self._state is not None else []
        n = self.config.solver_order
        return [None] * max(0, n - len(hist)) + hist[-n:]

    @model_outputs.setter
    def model_outputs(self, value):
        if self._state is None:
            raise RuntimeError("call set_timesteps() before setting model_outputs")
        self._state = replace(self._state, history=tuple(reversed([m for m in value if m is not None])))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None,
                      mu: float | None = None):
        """Build the step grid.  Exactly one of ``num_inference_steps``, ``timesteps`` (model timesteps,
        strictly decreasing) or ``sigmas`` (noise levels, strictly decreasing; VE sigma for VP models, t for flow
        models; a trailing 0 is taken as the final level) must be given, or ``sigmas`` and ``timesteps`` together: the
        levels from ``sigmas`` and the model's time at each from ``timesteps`` (a learned schedule with decoupled
        model time).  Resets all solver state."""
        num_inference_steps, timesteps, sigmas, model_times = self._grid_request(num_inference_steps, timesteps,
                                                                                 sigmas, mu)
        if self.flow is not None:
            grid, model_t = self._flow_grid(num_inference_steps, timesteps, sigmas, mu, model_times is not None)
        else:
            grid, model_t = self._vp_grid(num_inference_steps, timesteps, sigmas)
        if model_times is not None:
            model_t = self._decoupled_times(model_times, len(model_t))
        self._install(grid, model_t, device)

    def _grid_request(self, num_inference_steps, timesteps, sigmas, mu):
        """The checked request: (num_inference_steps, timesteps, sigmas, decoupled model times or None), a learned
        schedule in the config taking the place of a step count."""
        cfg = self.config
        learned = cfg.get("learned_timesteps")
        if learned is not None and num_inference_steps is not None:  # the config carries a learned schedule
            if num_inference_steps != len(learned):
                raise ValueError(f"this scheduler carries a learned {len(learned)}-step schedule (learned_timesteps): "
                                 f"num_inference_steps must be {len(learned)}, got {num_inference_steps}")
            num_inference_steps, timesteps, sigmas = None, learned, cfg.get("learned_sigmas")
        given = [n for n, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                ("sigmas", sigmas)) if v is not None]
        decoupled = given == ["timesteps", "sigmas"]
        if len(given) != 1 and not decoupled:
            raise ValueError(f"pass exactly one of num_inference_steps, timesteps or sigmas (or sigmas and timesteps "
                             f"together), got {given or 'none'}")
        model_times = None
        if decoupled:
            model_times, timesteps = np.asarray(timesteps, dtype=np.float64), None
        if mu is not None and not cfg.get("use_dynamic_shifting", False):
            raise ValueError("mu is only used with use_dynamic_shifting=True")
        if cfg.get("use_dynamic_shifting", False) and mu is None and timesteps is None and (
                sigmas is None or (self.flow is not None and not decoupled)):
            raise ValueError("use_dynamic_shifting=True needs mu in set_timesteps (the shift of the levels, sigmas "
                             "included)")
        return num_inference_steps, timesteps, sigmas, model_times

    def _flow_levels(self, n, timesteps, sigmas, mu, decoupled: bool):
        """A flow model's levels (t in (0, 1]; a trailing 0 kept) and the final level for "sigma_min"."""
        cfg, Ttrain = self.config, self.config.num_train_timesteps
        kind = cfg.get("time_shift_type", "exponential")
        check_flow_shift(cfg.flow_shift, mu, kind)
        shift = lambda v: shift_flow(v, cfg.flow_shift, mu, kind)  # noqa: E731
        t_min = float(shift([1.0 / Ttrain])[0])  # the final level for "sigma_min"
        terminal = cfg.get("shift_terminal")
        if timesteps is not None:
            return check_descending("timesteps", timesteps) / Ttrain, t_min
        if sigmas is not None:
            levels = check_descending("sigmas", sigmas)
            if levels.max() > 1:
                raise ValueError(f"flow sigmas must lie in (0, 1] (a trailing 0 marks the final level), got "
                                 f"{levels.tolist()}")
            if not decoupled:  # FlowMatch's (and diffusers' UniPC's) rule: custom sigmas are shifted too
                levels = shift(levels)
                if terminal is not None:
                    levels = stretch_to_terminal(levels, terminal)
            return levels, t_min
        n = check_num_steps(n, Ttrain)
        if self.spacing == FLOW_MATCH:
            levels = flow_match_sigmas(n, Ttrain, cfg.flow_shift, mu, kind)
            if terminal is not None:
                levels = stretch_to_terminal(levels, terminal)
            if self._flow_respacing is not None:
                levels = flow_match_convert(levels, self._flow_respacing, cfg.get("sigma_min"), cfg.get("sigma_max"))
            return levels, t_min
        if self.spacing in SIGMA_SPACINGS:
            # diffusers' UniPC with use_flow_sigmas and use_karras/exponential/beta_sigmas: the spacing on VE
            # sigmas s = t / (1 - t) in [sigma_min, sigma_max], mapped to flow time t = s / (1 + s); no shift
            lo, hi = self._sigma_bounds()
            s = sigma_spacing(self.spacing, n, lo, hi, self.flow, include_min=cfg.final_sigmas_type == "zero")
            return s / (1 + s), lo / (1 + lo)
        # diffusers' DPM/UniPC flow grid; a noise-prediction solver starts one training step below 1
        start = 1.0 - 1.0 / Ttrain if self.solver.prediction == "eps" or cfg.prediction_type == "epsilon" else 1.0
        levels = flow_sigmas(n, Ttrain, cfg.flow_shift, mu, start, kind)
        if terminal is not None:
            levels = stretch_to_terminal(levels, terminal)
        return levels, t_min

    def _flow_grid(self, n, timesteps, sigmas, mu, decoupled: bool):
        levels, t_min = self._flow_levels(n, timesteps, sigmas, mu, decoupled)
        cfg = self.config
        if levels[-1] == 0:
            levels, final = levels[:-1], 0.0
        else:
            final = 0.0 if cfg.final_sigmas_type == "zero" else t_min
        if not (levels.max() <= 1 and levels.min() > 0):
            raise ValueError(f"flow levels must lie in (0, 1], got {levels.tolist()}")
        if levels[0] == 1 and cfg.prediction_type == "epsilon":
            raise ValueError("an epsilon-prediction model cannot be evaluated at flow sigma 1 (alpha = 0): its "
                             f"noise prediction carries no information there; got levels {levels.tolist()}")
        if final >= levels[-1]:
            raise ValueError(f"the final flow sigma {final} must be below the last level {levels[-1]}")
        self.sigmas = torch.tensor(np.append(levels, final), dtype=torch.float32)
        return Grid.from_times(self.flow, np.append(levels, final)), torch.from_numpy(levels * cfg.num_train_timesteps).float()

    def _vp_levels(self, n, timesteps, sigmas):
        """A VP model's VE levels, the timesteps they came from (None: to be derived) and the final level: 0 (a
        trailing 0 in ``sigmas``, or final_sigmas_type "zero"), else the trained range's smallest sigma, or the
        sigma spacing's own sigma_min."""
        cfg, vp, Ttrain = self.config, self.vp, self.config.num_train_timesteps
        final_zero = cfg.final_sigmas_type == "zero"
        final = 0.0 if final_zero else math.exp(vp.log_sigmas[0])
        if timesteps is not None:
            ts = check_descending("timesteps", timesteps)
            if ts[0] > Ttrain - 1 or ts[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {Ttrain - 1}], got {ts.tolist()}")
            return vp.sigma_ve(torch.tensor(ts, dtype=F64)).numpy(), ts, final
        if sigmas is not None:
            levels = check_descending("sigmas", sigmas)
            if levels[-1] == 0:
                return levels[:-1], None, 0.0
            return levels, None, final
        n = check_num_steps(n, Ttrain)
        if self.spacing in TIMESTEP_SPACINGS:
            ts = self._discrete_timesteps(n)
            return vp.sigma_ve(torch.tensor(ts, dtype=F64)).numpy(), ts, final
        sigma_min, sigma_max = self._sigma_bounds()  # the spacing ends at its own sigma_min
        levels = sigma_spacing(self.spacing, n, sigma_min, sigma_max, vp, include_min=final_zero)
        return levels, None, 0.0 if final_zero else sigma_min

    def _vp_grid(self, n, timesteps, sigmas):
        cfg, vp = self.config, self.vp
        levels, ts, final = self._vp_levels(n, timesteps, sigmas)
        if ts is None:
            ts = vp.t_from_sigma_ve(torch.tensor(levels, dtype=F64)).numpy()
            if cfg.beta_schedule != "squaredcos_cap_v2" or cfg.trained_betas is not None:
                ts = ts.round()
        lo_t, hi_t = math.exp(vp.log_sigmas[0]), math.exp(vp.log_sigmas[-1])
        if final >= levels[-1]:
            raise ValueError(f"the final sigma ({final:.6g}, final_sigmas_type={cfg.final_sigmas_type!r}) must be "
                             f"below the last level {levels[-1]:.6g}: use final_sigmas_type='zero'")
        if levels.max() > hi_t * (1 + 1e-4) or levels.min() < lo_t * (1 - 1e-4):  # 1e-4: published rounding (AYS)
            raise ValueError(f"sigmas must lie in the model's trained range [{lo_t:.6g}, {hi_t:.6g}] (a trailing 0 "
                             f"marks the end), got {levels.tolist()}: outside it the model's time would be clipped "
                             f"and the levels would not be the ones integrated")
        if np.any(np.diff(levels) >= 0):
            dup = sorted({float(v) for v, w in zip(ts, ts[1:]) if v == w})
            raise ValueError(f"num_inference_steps={len(levels)} with timestep_spacing={self.spacing!r} puts two "
                             f"steps on the same level (timesteps {dup} repeat after rounding): use fewer steps, "
                             f"another spacing ('trailing', 'leading', 'karras', ...) or sigmas=")
        ts = np.asarray(ts, dtype=np.float64)
        # integer timesteps stay int64 (diffusers' convention); fractional ones (a learned schedule's exact
        # levels) reach the model as they are
        model_t = torch.from_numpy(ts).to(torch.int64) if np.array_equal(ts, np.round(ts)) else torch.from_numpy(ts).float()
        self.sigmas = torch.tensor(np.append(levels, final), dtype=torch.float32)
        return Grid.from_sigma_ve(vp, np.append(levels, final)), model_t

    def _decoupled_times(self, model_times: np.ndarray, n: int) -> torch.Tensor:
        if len(model_times) != n or not np.isfinite(model_times).all():
            raise ValueError(f"timesteps (the model's time at each level) must be {n} finite numbers, one per level "
                             f"in sigmas, got {model_times.tolist()}")
        top = self.config.num_train_timesteps if self.flow is not None else self.config.num_train_timesteps - 1
        if model_times.min() < 0 or model_times.max() > top:
            raise ValueError(f"timesteps (the model's time at each level) must lie in [0, {top}], the model's "
                             f"trained times, got {model_times.tolist()}")
        return torch.from_numpy(model_times).float()

    def _install(self, grid: Grid, model_t: torch.Tensor, device):
        """Teleportation's skip, the learned scales, and a fresh solver state on ``grid``."""
        lam = grid.lam
        flat = [i for i in range(grid.num_steps) if not lam[i + 1] > lam[i]]
        if flat:  # levels a float64 ULP apart: the solvers divide by the step in log-SNR
            i = flat[0]
            raise ValueError(f"levels {i} and {i + 1} of the grid ({self.sigmas[i].item():.6g}, "
                             f"{self.sigmas[i + 1].item():.6g}) are too close: the log-SNR does not increase between "
                             f"them; use distinct levels")
        skip, self._teleport_from = self._teleport_skip(grid), None
        if skip:  # the tail of the same schedule: teleportation replaces the first ``skip`` steps
            self._teleport_from = (grid.alpha[0], grid.sigma[0])
            grid = Grid(grid.alpha[skip:], grid.sigma[skip:], grid.lam[skip:], grid.t[skip:])
            model_t, self.sigmas = model_t[skip:], self.sigmas[skip:]
        # the model calls: one a step for the multistep solvers, several for a staged one (Heun)
        self._calls = self.solver.calls(grid)
        if [c for c, _ in self._calls] != list(range(grid.num_steps)):
            if any(node == grid.num_steps for node, _ in self._calls):  # a stage at the end level (sigma_min)
                end = float(self.model_time(grid)(grid.num_steps))
                end = round(end) if model_t.dtype == torch.int64 else end
                model_t = torch.cat([model_t, torch.tensor([end], dtype=model_t.dtype)])
            model_t = model_t[[node for node, _ in self._calls]]
        self.timesteps = model_t.to(device) if device is not None else model_t
        self.num_inference_steps = grid.num_steps
        scales = self.config.get("learned_scales")
        if scales is not None:  # per-step scales of the model's prediction, learned with the schedule
            # one per step of the schedule, teleported steps included
            self._scales = check_scales(scales, grid.num_steps + skip)[skip:]
        else:
            self._scales = None
        self._grid = grid
        coefficients = self.config.get("learned_coefficients")
        if coefficients is not None:  # per-step offsets of the solver's rules, learned with the schedule
            coefficients = check_coefficients(coefficients, grid.num_steps + skip)[skip:]
        self._state = self.solver.init(grid, self.prediction_transforms(grid.num_steps), coefficients)
        self._step_index = None
        self._begin_index = None
        self._tree = None
        self._exact = None
        self._restart_after_step = False
        self._bad_step = None

    def _discrete_timesteps(self, n: int) -> np.ndarray:
        """The model timesteps of diffusers' integer spacings (``timestep_spacing``) for ``n`` steps."""
        cfg = self.config
        return discrete_timesteps(self.spacing, n, cfg.num_train_timesteps, cfg.steps_offset, self._last_timestep())

    def _last_timestep(self) -> int:
        return self.config.num_train_timesteps

    def model_time(self, grid: Grid):
        """i -> the model's time input at node i of ``grid`` (fractional in general): the native time for VP models,
        t * num_train_timesteps for flow models, as ``timesteps`` holds for the scheduler's own grid."""
        scale = self.config.num_train_timesteps if self.flow is not None else 1.0
        return lambda i: grid.t[i] * scale

    def _sigma_bounds(self) -> tuple[float, float]:
        """The VE sigma range of the sigma spacings: config ``sigma_min`` / ``sigma_max`` (diffusers' UniPC keys)
        where set, else the trained range of the discrete schedule (diffusers uses it for flow models too)."""
        lo, hi = self.config.get("sigma_min"), self.config.get("sigma_max")
        lo = math.exp(self.vp.log_sigmas[0]) if lo is None else float(lo)
        hi = math.exp(self.vp.log_sigmas[-1]) if hi is None else float(hi)
        if not 0 < lo < hi < math.inf:
            raise ValueError(f"sigma_min and sigma_max must be finite with 0 < sigma_min < sigma_max, got "
                             f"sigma_min={lo}, sigma_max={hi}")
        return lo, hi

    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        j = self._index_of(timestep)
        if j is None:  # diffusers would take the last step here: a silent jump to the end of the solve
            raise ValueError(f"timestep {timestep!r} is not one of this scheduler's timesteps "
                             f"{self.timesteps.tolist()}: pass one of them, or call set_begin_index(i) first to start "
                             f"at step i")
        self._step_index = j

    def _check_finite(self, i: int, timestep, defer: bool | None = None, **tensors):
        """NaN/Inf in the model output, the sample or the given noise is an error naming the step and the tensor.
        One float64 sum each (NaN and Inf propagate) is the cheapest full check.  On an accelerator (``defer``) the
        first bad step is kept on the device so that ``step`` never waits for it: it is raised at the last step, and
        ``nonfinite_step`` reads it at any time."""
        totals = {k: v.detach().sum(dtype=torch.float64) for k, v in tensors.items() if v is not None}
        if defer is None:
            defer = next(iter(totals.values())).device.type != "cpu"
        total = sum(totals.values())  # NaN and Inf survive the sum: one conversion (or sync) for all of them
        if not defer:
            if not math.isfinite(float(total)):
                bad = [k for k, v in totals.items() if not math.isfinite(float(v))]
                raise ValueError(f"{' and '.join(bad)} contains NaN or Inf at step {i} (timestep {timestep!r})")
            return
        bad = ~torch.isfinite(total)
        step = torch.full((), i, device=total.device)
        prev = self._bad_step if self._bad_step is not None else torch.full((), -1, device=total.device)
        self._bad_step = torch.where((prev < 0) & bad, step, prev)
        if i == len(self._calls) - 1 and self.nonfinite_step is not None:
            raise ValueError(f"the model output, sample or noise contained NaN or Inf at step {self.nonfinite_step} "
                             f"({', '.join(totals)} were checked)")

    def _check_result(self, i: int, timestep, x_next: torch.Tensor, **inputs):
        """On the CPU: one sum of the step's result in its own dtype (NaN and Inf in the model output, the sample or
        the noise all reach it); only when that sum is not finite are the inputs summed in float64 to name the bad
        one.  A sum that overflowed on finite values passes; a result that overflowed from finite inputs is named."""
        if math.isfinite(float(x_next.sum())):
            return
        self._check_finite(i, timestep, defer=False, **inputs)
        if not math.isfinite(float(x_next.sum(dtype=torch.float64))):
            raise ValueError(f"the step's result contains NaN or Inf at step {i} (timestep {timestep!r}) from finite "
                             f"inputs: the update overflowed its dtype ({x_next.dtype})")

    @property
    def nonfinite_step(self) -> int | None:
        """The first step of this solve whose model output, sample or noise held NaN or Inf (None: none so far).
        On the CPU such a step raises at once; on an accelerator it raises at the last step, and reading this
        property (one device sync) lets a loop that stops early check."""
        if self._bad_step is None or int(self._bad_step) < 0:
            return None
        return int(self._bad_step)

    def _noise(self, i: int, like: torch.Tensor, generator, variance_noise):
        if variance_noise is not None:
            if variance_noise.shape != like.shape:
                raise ValueError(f"variance_noise must have shape {tuple(like.shape)}, got {tuple(variance_noise.shape)}")
            return variance_noise.to(device=like.device, dtype=like.dtype)
        if self.config.get("noise_type", "gaussian") == "brownian_tree":
            u, g = self.solver.brownian_time, self._grid
            if self._tree is None:
                ends = [float(self.vp.lam(torch.tensor(t, dtype=F64))) for t in (self.vp.t_max, self.vp.t_min)]
                finite = [u(l) for l in list(g.lam) + ends if math.isfinite(l)]
                per = isinstance(generator, (list, tuple))
                self._tree = BrownianTree(min(finite), max(finite), like.shape, seeds_from(generator, like.shape[0], per))
            lo, hi = self._tree.u0, self._tree.u1
            # a step from pure noise (lambda = -inf, flow sigma 1) starts at the tree's first time
            z = self._tree.increment(*(min(max(u(l), lo), hi) for l in (g.lam[i], g.lam[i + 1])))
            return z.to(device=like.device, dtype=like.dtype)
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)

    def _make_threshold(self):
        cfg = self.config
        if not cfg.get("thresholding", False):
            return None
        ratio, cap = cfg.dynamic_thresholding_ratio, cfg.sample_max_value
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be a quantile in (0, 1], got {ratio!r}")
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf:
            raise ValueError(f"sample_max_value must be a positive finite number (the largest threshold of the "
                             f"data prediction), got {cap!r}")
        return lambda x0: dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict: bool = True,
             variance_noise: torch.Tensor | None = None, **kwargs):
        """One solver step from the current noise level to the next; returns ``SchedulerOutput(prev_sample)``."""
        if self._state is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before set_timesteps(): call set_timesteps first")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self._calls):
            raise RuntimeError(f"step() called {i + 1} times for {len(self._calls)} model calls ({self.num_inference_steps} "
                               f"steps): call set_timesteps again")
        if model_output.shape != sample.shape:
            if self.config.get("variance_type") in ("learned", "learned_range") and model_output.shape[1] == 2 * sample.shape[1]:
                model_output = model_output[:, : sample.shape[1]]
            else:
                raise ValueError(f"model_output shape {tuple(model_output.shape)} must equal sample shape {tuple(sample.shape)}")
        inputs = {"model_output": model_output, "sample": sample, "variance_noise": variance_noise}
        on_cpu = sample.device.type == "cpu"
        if not on_cpu:  # deferred on the device: the inputs' sums, so that step never waits for a sync
            self._check_finite(i, timestep, **inputs)
        elif variance_noise is not None:  # given noise is checked even where this step does not use it
            self._check_finite(i, timestep, defer=False, variance_noise=variance_noise)
        cdt = self.compute_dtype(sample)
        x, out = self._exact_sample(sample, cdt), model_output.to(cdt)
        g = self._grid
        node, k = self._calls[i]  # the call's grid node and the step it belongs to
        state = self._state
        if state.index != k:  # a begin index (img2img) or a step count reused: start step k afresh
            if node != k:
                raise RuntimeError(f"model call {i} is the second stage of step {k}: begin at a step's first call")
            staged = len(self._calls) != g.num_steps
            state = restarted(state, index=k) if staged else replace(state, index=k)
        x_next, state = call_step(self.solver, g, state, x, out, self.config.prediction_type, node, k, self._scales,
                                  self._threshold, lambda step: self._noise(step, x, generator, variance_noise))
        prev = x_next.to(sample.dtype)
        if on_cpu:  # in the sample's own dtype: a result that overflows float16 only when cast is caught too
            self._check_result(i, timestep, prev, **inputs)
        if self._restart_after_step and self._ends_step(i):
            state, self._restart_after_step = restarted(state), False
        self._state, self._step_index = state, i + 1
        self._exact = x_next if self.keeps_exact_samples else None
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _ends_step(self, i: int) -> bool:
        """Whether model call ``i`` is the last of its step (always, but for the first stage of a staged step)."""
        return i + 1 == len(self._calls) or self._calls[i + 1][1] != self._calls[i][1]

    def _exact_sample(self, sample: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        """The sample in the compute dtype: with ``keeps_exact_samples``, the last step's own result wherever the
        pipeline hands back exactly that result rounded to its dtype, element by element (an inpainting blend
        changes some latents: those come from the sample).  Elementwise, so no device sync."""
        e, x = self._exact, sample.to(cdt)
        if e is None or e.dtype != cdt or e.shape != sample.shape or e.device != sample.device:
            return x
        return torch.where(e.to(sample.dtype) == sample, e, x)

    #: keep each step's result in the compute dtype and continue from it while the pipeline hands that result back
    #: rounded to its own dtype (BDIA: the float64 chain its exact inverse retraces; a float32 model's inputs are
    #: the same rounded samples either way)
    keeps_exact_samples = False

    def compute_dtype(self, sample: torch.Tensor) -> torch.dtype:
        """The dtype a step computes in: float64 for float64 samples, else float32."""
        return torch.float64 if sample.dtype == torch.float64 else torch.float32

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """FlowMatch's forward process for img2img and inpainting: (1 - sigma) sample + sigma noise, with sigma the
        grid's level at ``begin_index`` (before the first step), at ``step_index`` (after it) or, with no begin
        index, at each given timestep."""
        if self.flow is None:
            raise ValueError(f"scale_noise is the flow-matching forward process, and this {type(self).__name__} is "
                             f"a VP scheduler (use_flow_sigmas=False): use add_noise")
        if self._grid is None:
            raise RuntimeError("call set_timesteps() before scale_noise")
        if noise is None:
            raise ValueError("scale_noise needs noise (a tensor of the sample's shape)")
        timestep = torch.as_tensor(timestep).reshape(-1)
        if self._begin_index is None:
            idx = [self._index_of(t) for t in timestep]
            missing = [float(t) for t, j in zip(timestep, idx) if j is None]
            if missing:
                raise ValueError(f"timesteps {missing} are not on this scheduler's grid {self.timesteps.tolist()}")
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(timestep)
        sigma = self.sigmas.to(device=sample.device, dtype=sample.dtype)[idx]
        sigma = sigma.reshape((-1,) + (1,) * (sample.ndim - 1))
        return sigma * noise.to(device=sample.device, dtype=sample.dtype) + (1.0 - sigma) * sample

    def _index_of(self, timestep) -> int | None:
        """Where ``timestep`` is on the grid: an exact match (the second one when a timestep repeats, diffusers'
        rule), else the nearest timestep when it is within the rounding of the given timestep's dtype (Flux casts
        timesteps to bfloat16), else None."""
        ts = self.timesteps
        if torch.is_tensor(timestep):
            t = timestep.to(ts.device)
            eps = torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0
        else:
            t, eps = torch.tensor(float(timestep), device=ts.device), 0.0
        match = (ts == t).nonzero()
        if len(match):
            return int(match[1 if len(match) > 1 else 0])
        if eps:
            gap = (ts.double() - t.double()).abs()
            j = int(gap.argmin())
            if float(gap[j]) <= eps * max(1.0, abs(float(t))):
                return j
        return None

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise at the given model timesteps (at the grid's own levels once set)."""
        timesteps = torch.as_tensor(timesteps).reshape(-1).cpu()
        if self._grid is not None and self._begin_index is not None:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(timesteps)
            a = torch.tensor([self._grid.alpha[j] for j in idx], dtype=F64)
            s = torch.tensor([self._grid.sigma[j] for j in idx], dtype=F64)
        elif self.flow is not None:
            s = timesteps.to(F64) / self.config.num_train_timesteps
            a = 1 - s
        else:
            a, s = self.vp.alpha_sigma(timesteps.to(F64))
            if self._grid is not None:  # a timestep of the grid gets the grid's exact level
                ts = self.timesteps.cpu()
                for k, t in enumerate(timesteps):
                    hit = (ts == t).nonzero()
                    if len(hit):
                        j = int(hit[0])
                        a[k], s[k] = self._grid.alpha[j], self._grid.sigma[j]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        dt = original_samples.dtype
        a = a.to(device=original_samples.device, dtype=dt).reshape(shape)
        s = s.to(device=original_samples.device, dtype=dt).reshape(shape)
        return a * original_samples + s * noise.to(original_samples.device, dt)
