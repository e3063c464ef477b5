"""Step spacings: one string selects one.  Every spacing returns the N noise levels at which the model is
called, as VE sigmas (sigma / alpha) in float64, descending; the final level (0 or sigma_min) is appended
by ``with_final``.  Model timesteps come from the schedule's inverse, never from a second formula."""
from __future__ import annotations

import math

import numpy as np
import torch

from .schedules import F64, NoiseSchedule

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
# FlowMatchEulerDiscreteScheduler's grid and semantics (a flow model): what from_config of a FlowMatch config selects
FLOW_MATCH = "flow_match"
SIGMA_SPACINGS = ("karras", "exponential", "logsnr", "beta", "time_uniform", "time_quadratic", "ays_sd15", "ays_sdxl")
SPACINGS = TIMESTEP_SPACINGS + SIGMA_SPACINGS + (FLOW_MATCH,)
FINAL_SIGMAS = ("zero", "sigma_min")

# Align Your Steps (Sabour et al., ICML 2024), the published 10-step lists.
AYS_SIGMAS = {"sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152]}
AYS_TIMESTEPS = {"sd15": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24],
                 "sdxl": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13]}


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_num_steps(num_inference_steps, num_train_timesteps: int | None = None) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if n < 1 or (num_train_timesteps is not None and n > num_train_timesteps):
        upper = f" and <= num_train_timesteps ({num_train_timesteps})" if num_train_timesteps else ""
        raise ValueError(f"num_inference_steps must be >= 1{upper}, got {n}")
    return n


def loglinear_interp(values, n: int) -> np.ndarray:
    """Resample a decreasing positive list to n points, linearly in log value (AYS' rule)."""
    v = np.asarray(values, dtype=np.float64)
    if n == len(v):
        return v.copy()
    xs = np.linspace(0.0, 1.0, len(v))
    return np.exp(np.interp(np.linspace(0.0, 1.0, n), xs, np.log(v)))


def check_steps_offset(steps_offset) -> int:
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
    return int(steps_offset)


def discrete_timesteps(spacing: str, n: int, num_train_timesteps: int, steps_offset: int = 0,
                       last_timestep: int | None = None) -> np.ndarray:
    """diffusers' integer timestep spacings (Table 2 of arXiv 2305.08891)."""
    T = num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        check_steps_offset(steps_offset)
        ratio = T // (n + 1)
        if n * ratio + steps_offset > num_train_timesteps - 1:
            raise ValueError(f"steps_offset={steps_offset} with timestep_spacing='leading' and {n} steps puts the first "
                             f"timestep at {n * ratio + steps_offset}, beyond the last trained one "
                             f"({num_train_timesteps - 1}): steps_offset must be at most "
                             f"{max(num_train_timesteps - 1 - n * ratio, 0)}")
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = num_train_timesteps / n
        return np.arange(T, 0, -ratio).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


def sigma_spacing(spacing: str, n: int, sigma_min: float, sigma_max: float, schedule: NoiseSchedule,
                  rho: float = 7.0, include_min: bool = True) -> np.ndarray:
    """N VE sigmas from sigma_max down to sigma_min (the last one is sigma_min when ``include_min``; otherwise
    the N levels of an N+1-point grid whose end point sigma_min is not a model call)."""
    m = n if include_min else n + 1
    ramp = np.linspace(0.0, 1.0, m)
    if spacing == "karras":
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        s = (hi + ramp * (lo - hi)) ** rho
    elif spacing in ("exponential", "logsnr"):
        s = np.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max)))
    elif spacing == "beta":
        import scipy.stats

        s = sigma_min + scipy.stats.beta.ppf(1 - ramp, 0.6, 0.6) * (sigma_max - sigma_min)
    elif spacing in ("time_uniform", "time_quadratic"):
        t_hi = float(schedule.t_from_sigma_ve(torch.tensor(sigma_max, dtype=F64)))
        t_lo = float(schedule.t_from_sigma_ve(torch.tensor(sigma_min, dtype=F64)))
        if spacing == "time_uniform":
            t = t_hi + ramp * (t_lo - t_hi)
        else:
            t = (math.sqrt(t_hi) + ramp * (math.sqrt(t_lo) - math.sqrt(t_hi))) ** 2
        s = schedule.sigma_ve(torch.tensor(t, dtype=F64)).numpy()
    elif spacing in ("ays_sd15", "ays_sdxl"):
        key = spacing[4:]
        base = AYS_SIGMAS.get(key)
        if base is None:
            base = schedule.sigma_ve(torch.tensor(AYS_TIMESTEPS[key], dtype=F64)).numpy()
        s = loglinear_interp(base, m)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return np.asarray(s, dtype=np.float64)[:n]


TIME_SHIFT_TYPES = ("exponential", "linear")


def check_flow_shift(shift, mu=None, time_shift_type: str = "exponential") -> None:
    """A flow shift is a positive finite number; ``mu`` (dynamic shifting) a finite one (positive for the linear
    time shift); the time-shift type one of ``TIME_SHIFT_TYPES``."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"flow_shift (FlowMatch's shift) must be a positive finite number, got {shift!r}")
    check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
    if mu is not None:
        if isinstance(mu, bool) or not isinstance(mu, (int, float, np.floating)) or not math.isfinite(mu):
            raise ValueError(f"mu must be a finite number, got {mu!r}")
        if time_shift_type == "linear" and mu <= 0:
            raise ValueError(f"mu must be positive with time_shift_type='linear', got {mu!r}")


def flow_sigmas(n: int, num_train_timesteps: int, shift: float = 1.0, mu: float | None = None,
                start: float = 1.0, time_shift_type: str = "exponential") -> np.ndarray:
    """diffusers' DPM/UniPC ``use_flow_sigmas`` levels t in (0, 1]: linspace(start, 1/T, N+1)[:-1], shifted by
    ``shift`` (SD3) or by ``mu`` (Flux).  ``start`` < 1 keeps alpha = 1 - t > 0 for noise-prediction solvers."""
    s = np.linspace(start, 1.0 / num_train_timesteps, n + 1)[:-1]
    return shift_flow(s, shift, mu, time_shift_type)


def flow_match_sigmas(n: int, num_train_timesteps: int, shift: float = 1.0, mu: float | None = None,
                      time_shift_type: str = "exponential") -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler's default N levels: linspace(1, sigma_min, N) then shifted, where sigma_min
    is the shifted 1/T of its training table (not shifted when ``mu`` is used, i.e. with dynamic shifting)."""
    lo = 1.0 / num_train_timesteps
    if mu is None:
        lo = float(shift_flow([lo], shift)[0])
    return shift_flow(np.linspace(1.0, lo, n), shift, mu, time_shift_type)


def shift_flow(s, shift: float = 1.0, mu: float | None = None, time_shift_type: str = "exponential") -> np.ndarray:
    """The flow time shift: shift t / (1 + (shift - 1) t), or with ``mu`` (dynamic shifting) m / (m + 1/t - 1)
    with m = exp(mu) ("exponential") or m = mu ("linear")."""
    s = np.asarray(s, dtype=np.float64)
    if mu is not None:
        m = math.exp(mu) if time_shift_type == "exponential" else float(mu)
        with np.errstate(divide="ignore"):
            return np.where(s > 0, m / (m + (1.0 / s - 1.0)), 0.0)
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_match_convert(levels, spacing: str, sigma_min: float | None = None, sigma_max: float | None = None,
                       rho: float = 7.0) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler's ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas``:
    the same number of levels respaced between the (shifted) levels' own ends, in flow time."""
    v = np.asarray(levels, dtype=np.float64)
    lo = float(v[-1]) if sigma_min is None else float(sigma_min)
    hi = float(v[0]) if sigma_max is None else float(sigma_max)
    ramp = np.linspace(0.0, 1.0, len(v))
    if spacing == "karras":
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    if spacing == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), len(v)))
    if spacing == "beta":
        import scipy.stats

        return lo + scipy.stats.beta.ppf(1 - ramp, 0.6, 0.6) * (hi - lo)
    raise ValueError(f"a FlowMatch respacing must be 'karras', 'exponential' or 'beta', got {spacing!r}")


def stretch_to_terminal(levels, shift_terminal: float) -> np.ndarray:
    """diffusers' ``shift_terminal``: stretch flow levels t so that 1 - t scales and the last level is ``shift_terminal``."""
    levels = np.asarray(levels, dtype=np.float64)
    if not 0 < shift_terminal < 1:
        raise ValueError(f"shift_terminal must lie in (0, 1), got {shift_terminal!r}")
    one_minus = 1.0 - levels
    return 1.0 - one_minus * (1.0 - shift_terminal) / one_minus[-1]


def check_descending(name: str, values, allow_final_zero: bool = True) -> np.ndarray:
    v = np.asarray(values.detach().cpu() if torch.is_tensor(values) else values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {v.tolist()}")
    if np.any(np.diff(v) >= 0):
        raise ValueError(f"{name} must be strictly decreasing, got {v.tolist()}")
    body = v[:-1] if (allow_final_zero and v[-1] == 0 and v.size > 1) else v
    if np.any(body <= 0) and name == "sigmas":
        raise ValueError(f"{name} must be positive (a trailing 0 marks the final level), got {v.tolist()}")
    if np.any(v < 0):
        raise ValueError(f"{name} must be non-negative, got {v.tolist()}")
    return v


SCALE_RANGE = (0.0, 10.0)  # a learned per-step scale of the model's prediction: a correction near 1, never 0 or huge


def check_scales(scales, n: int, name: str = "learned_scales") -> list[float]:
    """``n`` per-step prediction scales, each finite in (0, 10]."""
    lo, hi = SCALE_RANGE
    try:
        values = [float(v) for v in scales]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers in ({lo:g}, {hi:g}], got {scales!r}") from None
    if len(values) != n or not all(lo < v <= hi for v in values):  # NaN fails too
        raise ValueError(f"{name} must be {n} numbers in ({lo:g}, {hi:g}] (one per step; 1: no scaling), got {values}")
    return values
