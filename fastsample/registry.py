"""The solver registry: every scheduler is registered once, by the file that defines it, and everything that lists
solvers reads it: ``make_scheduler``, the sweep's scheduler names, the scripts' choices and the test parametrisations
(convergence order, the adapter contract, pipelines).  A solver that is not registered does not exist anywhere, and
one that is registered is tested everywhere.

    register("unipc", UniPCScheduler, variants=[Variant("unipc3", {"solver_order": 3}, order=4), ...],
             diffusers_peer="UniPCMultistepScheduler")

A *variant* is a named configuration of the scheduler (its config keys) with the convergence order it declares on an
exact-score problem (``None`` for a stochastic one); its name is usable wherever a scheduler name is
(``make_scheduler("unipc3")``, a sweep row).  ``diffusers_peer`` names the diffusers scheduler that the solver equals
under ``peer_options`` (the equality and pipeline tests check it); ``peer_in_pipelines`` False says the equality holds
only under conditions a pipeline's defaults do not meet, so only the equality tests check it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

BUILTIN_MODULES = ("fastsample.solvers",)  # imported on first use: the solver files register themselves


@dataclass(frozen=True)
class Variant:
    name: str
    options: dict = field(default_factory=dict)
    order: int | None = None  # the declared convergence order of the ODE solver (None: stochastic)
    strong_order: float | None = None  # a stochastic variant's declared strong order (tests/test_sde.py)


@dataclass(frozen=True)
class SolverInfo:
    name: str
    scheduler: type
    variants: tuple
    aliases: tuple = ()
    diffusers_peer: str | None = None
    peer_options: dict = field(default_factory=dict)
    peer_in_pipelines: bool = True

    def make(self, **config):
        return self.scheduler(**config)

    def takes(self, key: str) -> bool:
        """Whether the scheduler's config has ``key`` (its ``__init__`` signature, through diffusers' wrapper)."""
        return key in config_keys(self.scheduler)


def config_keys(scheduler_class) -> set:
    """The config keys of a scheduler class: its ``__init__`` parameters (``inspect.signature`` follows diffusers'
    ``register_to_config`` wrapper, whose own code object has only ``*args, **kwargs``)."""
    import inspect

    return set(inspect.signature(scheduler_class.__init__).parameters) - {"self"}


_REGISTRY: dict[str, SolverInfo] = {}
_loaded = False


def register(name: str, scheduler: type, variants=(), aliases=(), diffusers_peer: str | None = None,
             peer_options: dict | None = None, peer_in_pipelines: bool = True) -> SolverInfo:
    """Register ``scheduler`` (a ``FastScheduler`` subclass) under ``name``; names, aliases and variant names are
    one namespace, and a clash is an error."""
    from .scheduler import FastScheduler

    if not (isinstance(scheduler, type) and issubclass(scheduler, FastScheduler)):
        raise TypeError(f"register({name!r}): scheduler must be a FastScheduler subclass, got {scheduler!r}")
    variants = tuple(variants)
    taken = set(all_names(load=False))
    new = [name, *aliases, *(v.name for v in variants)]
    clash = sorted((taken & set(new)) | {n for n in new if new.count(n) > 1})
    if clash:
        raise ValueError(f"register({name!r}): the names {clash} are already registered")
    info = SolverInfo(name, scheduler, variants, tuple(aliases), diffusers_peer, dict(peer_options or {}),
                      bool(peer_in_pipelines))
    _REGISTRY[name] = info
    return info


def unregister(name: str) -> None:
    """Remove a registered solver (tests that register a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def _ensure_loaded():
    global _loaded
    if not _loaded:
        import importlib

        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def solvers() -> list[SolverInfo]:
    """Every registered solver, in registration order."""
    _ensure_loaded()
    return list(_REGISTRY.values())


def variants() -> dict[str, tuple[SolverInfo, Variant]]:
    """Every registered variant by name: ``(solver, variant)``."""
    return {v.name: (info, v) for info in solvers() for v in info.variants}


def all_names(load: bool = True) -> list[str]:
    if load:
        _ensure_loaded()
    return [n for info in _REGISTRY.values() for n in (info.name, *info.aliases, *(v.name for v in info.variants))]


def lookup(name: str) -> tuple[SolverInfo, dict]:
    """``(solver, options)`` for a solver name, an alias or a variant name; a clear error for anything else."""
    _ensure_loaded()
    for info in _REGISTRY.values():
        if name == info.name or name in info.aliases:
            return info, {}
        for v in info.variants:
            if v.name == name:
                return info, dict(v.options)
    raise ValueError(f"scheduler name must be one of {tuple(all_names())}, got {name!r}")


def make_scheduler(name: str, **config):
    """The registered scheduler ``name`` (a solver, an alias or a variant), with ``config`` over the variant's
    options."""
    info, options = lookup(name)
    return info.make(**{**options, **config})


def solver_on(schedule, name: str, **config):
    """The ``Solver`` of scheduler ``name`` (with ``config``) for another noise schedule than its own (a schedule
    the scheduler cannot express, as in the convergence tests' continuous VP and VE problems)."""
    scheduler = make_scheduler(name, **config)
    scheduler.schedule = schedule
    return scheduler.make_solver()
