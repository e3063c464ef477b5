"""Quality against the number of model calls: the one evaluation engine behind every table (``scripts/fid_sweep.py``
is its command line, ``make results`` runs the committed plan).

A sweep is rows (scheduler specs: a name, a class with keyword arguments, a ``save_pretrained`` folder, optionally a
T-Stitch pair) x NFE.  Sample i always starts from the noise of its own generator, seeded with (seed, i), so a
cell's samples are the same whatever the batch size or the number of processes.  A cell's key hashes everything that
decides its result (the model and its weights, the row and its scheduler's config, NFE, sample count, seed, metric),
so two models or two configs never share a cell, and a rerun skips exactly the finished ones.  Each finished cell
is written to a locked JSONL file atomically (``fastsample.results``), so an interrupted sweep loses at most the
cell in progress.  Under ``accelerate launch`` each process samples its shard and the metric is computed once, on
the main process.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from .results import read_records  # noqa: F401  (the sweep's reader, re-exported)
from .sampling import model_fn, sample

# name: (source, class name, config).  Ours are the registry's variants (fastsample.registry: every registered
# scheduler's named configurations); diffusers' versions of the same methods are listed here, on the zoo's config.
def _ours() -> dict:
    from .registry import variants

    return {name: ("ours", info.scheduler.__name__, dict(v.options)) for name, (info, v) in variants().items()}


DIFFUSERS_SCHEDULERS = {
    "diffusers-ddim": ("diffusers", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
    "diffusers-dpm++2m": ("diffusers", "DPMSolverMultistepScheduler", {"solver_order": 2}),
    "diffusers-dpm++3m": ("diffusers", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    "diffusers-deis": ("diffusers", "DEISMultistepScheduler", {"solver_order": 3}),
    "diffusers-unipc": ("diffusers", "UniPCMultistepScheduler", {"solver_order": 3}),
    # diffusers' flow schedulers, for a flow task ("<zoo model>:flow"): FlowMatch's Euler and Heun on FlowMatch's grid,
    # DPM-Solver++ and UniPC on their own use_flow_sigmas grid
    "diffusers-fm-euler": ("diffusers", "FlowMatchEulerDiscreteScheduler", {}),
    "diffusers-fm-heun": ("diffusers", "FlowMatchHeunDiscreteScheduler", {}),
    "diffusers-dpm++2m-flow": ("diffusers", "DPMSolverMultistepScheduler",
                               {"solver_order": 2, "use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "diffusers-dpm++3m-flow": ("diffusers", "DPMSolverMultistepScheduler",
                               {"solver_order": 3, "use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "diffusers-unipc-flow": ("diffusers", "UniPCMultistepScheduler",
                             {"solver_order": 3, "use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}


def schedulers() -> dict:
    """Every scheduler name of the sweep: the registry's variants (as registered now) and diffusers' peers."""
    return {**_ours(), **DIFFUSERS_SCHEDULERS}


def ours() -> tuple:
    return tuple(_ours())


FLOW_ONLY = ("diffusers-fm-euler", "diffusers-fm-heun", "diffusers-dpm++2m-flow", "diffusers-dpm++3m-flow",
             "diffusers-unipc-flow")
FLOW = ":flow"  # a task's model "<zoo model>:flow": the zoo model as a flow velocity model (zoo.load(parameterization=...))
DEFAULT_SCHEDULERS = ("ddim", "dpm++2m", "dpm++3m", "deis-tab3", "unipc3", "diffusers-ddim", "diffusers-dpm++2m",
                      "diffusers-dpm++3m", "diffusers-deis", "diffusers-unipc")
FLOOR = "floor"          # the converged reference cell: UniPC-3 with many steps
FLOOR_SCHEDULER = "unipc3"
TESTBED = "testbed"
REFERENCE_CACHE = Path.home() / ".cache" / "fastsample" / "references"  # converged solves, per weights and seed

# Variants of our schedulers, named "<base>:<variant>", that use what was fitted or computed for a zoo model:
#   "<base>:dc"           DC-Solver ratios fitted at this NFE: <artefacts>/dc/<model>/nfe<N>-cfg1 (scripts/fit_dc.py)
#   "<base>:learned"      the learned schedule for this NFE: <artefacts>/learned/<model>/<stem>-nfe<N>.json
#                         (scripts/learn_schedule.py's dp fit; ":learned-gradient-scales" etc. name its other
#                         fits' files); its weights hash must match the model's
#   "<base>:<spacing>"    one of our schedulers with another step spacing (fastsample.timesteps.SPACINGS), e.g.
#                         "unipc3:karras": the hand-made spacings that learned schedules are measured against
#   "<base>:teleport<F>"  analytic Gaussian teleportation of the first fraction F of the steps, with the shipped
#                         Fashion-MNIST statistics: N steps, fewer model calls (the record's model_calls)
DC_BASES = {"unipc3": "unipc"}
LEARNED_STEMS = {"unipc3": "unipc3", "dpm++3m": "dpmsolver++3", "dpm++2m": "dpmsolver++2", "deis-tab3": "deis3"}
ARTEFACTS = Path(__file__).resolve().parent.parent  # the checkout: dc/ and learned/ beside the package


def parse_scheduler_name(name: str) -> tuple[str, str | None, float | str | None]:
    """``(base, variant, argument)`` of a sweep scheduler name, the argument being the spacing, the teleport
    fraction or the learned schedule's file suffix; a clear error for anything else."""
    from .timesteps import SPACINGS

    table, mine = schedulers(), ours()
    choices = (f"one of {tuple(table)}, or <base>:dc (base in {tuple(DC_BASES)}), <base>:learned[-<fit>] "
               f"(base in {tuple(LEARNED_STEMS)}), <base>:<spacing> (spacing in {SPACINGS}) or <base>:teleport<F> "
               f"(base in {mine}, 0 < F < 1, or F = -auto)")
    base, _, variant = str(name).partition(":")
    if base not in table or (variant and not variant.startswith(("dc", "learned", "teleport"))
                                  and variant not in SPACINGS):
        raise ValueError(f"scheduler must be {choices}, got {name!r}")
    if not variant:
        return base, None, None
    if variant in SPACINGS:
        if base not in mine:
            raise ValueError(f"scheduler must be {choices}, got {name!r}")
        return base, "spacing", variant
    if variant == "dc" or variant.startswith("learned"):
        suffix = variant[len("learned"):] if variant.startswith("learned") else None
        if base not in (DC_BASES if variant == "dc" else LEARNED_STEMS) or (suffix and not suffix.startswith("-")):
            raise ValueError(f"scheduler must be {choices}, got {name!r}")
        return (base, "dc", None) if variant == "dc" else (base, "learned", suffix)
    if variant == "teleport-auto":
        if base not in mine:
            raise ValueError(f"scheduler must be {choices}, got {name!r}")
        return base, "teleport", "auto"
    try:
        fraction = float(variant[len("teleport"):])
    except ValueError:
        raise ValueError(f"scheduler must be {choices}, got {name!r}") from None
    if base not in mine or not 0 < fraction < 1:
        raise ValueError(f"scheduler must be {choices}, got {name!r}")
    return base, "teleport", fraction


TELEPORT_PROBES = 16  # ":teleport-auto": the fitting noises (generator 0) on which the fraction is chosen


def artefact_name(model: str) -> str:
    """The folder name of a task model's fitted artefacts and caches: "fmnist-large:flow" -> "fmnist-large-flow"."""
    return model.replace(":", "-")


def base_config_for(cls, flow: bool) -> dict:
    """The zoo's schedule in ``cls``'s keys: the VP training config, or for a flow task FlowMatch's config
    (``zoo.FLOW_CONFIG`` for ours, ``zoo.FLOW_SCHEDULER_CONFIG`` for diffusers' FlowMatch schedulers; diffusers'
    other schedulers take the VP keys plus what a row adds, e.g. use_flow_sigmas and prediction_type)."""
    from .zoo import FLOW_CONFIG, FLOW_SCHEDULER_CONFIG, SCHEDULER_CONFIG

    ours = cls.__module__.startswith("fastsample")
    if cls.__name__.startswith("FlowMatch"):
        if not flow:
            raise ValueError(f"{cls.__name__} is a flow scheduler: it needs a flow task (a model ending in {FLOW!r})")
        return FLOW_SCHEDULER_CONFIG
    return FLOW_CONFIG if (flow and ours) else SCHEDULER_CONFIG


def make_named_scheduler(name: str, model: str | None = None, nfe: int | None = None, weights=None,
                         artefacts=ARTEFACTS, teleport_stats=None, model_fn=None, flow: bool | None = None):
    """The scheduler a sweep name stands for, on the zoo's training config.  ":dc" and ":learned" need the zoo
    ``model``'s name and the ``nfe`` they were fitted at; ":learned" checks the schedule's weights hash against
    ``weights`` (the model's module) when given.  ":teleport<F>" uses ``teleport_stats`` (a GaussianStats file),
    by default the shipped Fashion-MNIST statistics for a zoo model; ":teleport-auto" chooses F for this NFE with
    ``solvers.teleport.choose_teleport_fraction`` on ``TELEPORT_PROBES`` fitting noises through ``model_fn``.
    ``flow`` (default: whether ``model`` ends in ":flow"): the flow view of the zoo's models, where our schedulers take
    ``zoo.FLOW_CONFIG`` (FlowMatch's schedule) and only diffusers' flow schedulers (``FLOW_ONLY``) are allowed."""
    base, variant, argument = parse_scheduler_name(name)
    import diffusers

    flow = bool(model and model.endswith(FLOW)) if flow is None else flow
    table = schedulers()
    source, cls_name, cfg = table[base]
    if source == "diffusers" and (base in FLOW_ONLY) != flow:
        raise ValueError(f"scheduler {name!r} is a diffusers {'flow' if base in FLOW_ONLY else 'VP'} scheduler; "
                         f"this task is {'a flow' if flow else 'VP'} model ({model!r}): use one of "
                         f"{[n for n in table if table[n][0] == 'ours' or (n in FLOW_ONLY) == flow]}")
    if source == "ours":
        from .registry import variants

        cls = variants()[base][0].scheduler
    else:
        cls = getattr(diffusers, cls_name)
    base_config = base_config_for(cls, flow)
    if variant is None:
        return cls(**{**base_config, **cfg})
    if variant == "spacing":
        return cls(**base_config, **cfg, spacing=argument)
    if variant == "teleport":
        return _teleport_scheduler(name, cls, {**base_config, **cfg}, argument, model, nfe, teleport_stats, model_fn)
    if model is None or model == TESTBED:
        raise ValueError(f"scheduler {name!r} needs a zoo model's fitted artefacts, got model {model!r}")
    if variant == "dc":
        return _dc_scheduler(name, base, cfg, Path(artefacts) / "dc" / artefact_name(model) / f"nfe{nfe}-cfg1", model,
                             nfe)
    return _learned_scheduler(cls, {**base_config, **cfg}, Path(artefacts), model, nfe, base, argument, weights,
                              teleport_stats, flow)


def _shipped_stats(teleport_stats) -> str:
    from .zoo import TELEPORT_STATS

    return str(teleport_stats if teleport_stats is not None else TELEPORT_STATS)


def _teleport_scheduler(name, cls, config, argument, model, nfe, teleport_stats, model_fn):
    """":teleport<F>" (or ":teleport-auto": F chosen for this NFE on TELEPORT_PROBES noises through ``model_fn``)."""
    if teleport_stats is None and (model is None or model == TESTBED):
        raise ValueError(f"scheduler {name!r} needs teleport statistics or a zoo model, got model {model!r}")
    stats = _shipped_stats(teleport_stats)
    if argument != "auto":
        return cls(**config, teleport_stats=stats, teleport_fraction=argument)
    if model_fn is None or nfe is None:
        raise ValueError(f"scheduler {name!r} chooses its fraction with the model: pass model_fn and nfe")
    from fastsample.solvers.teleport import GaussianStats, choose_teleport_fraction

    gauss = GaussianStats.load(stats)
    probes = torch.randn(TELEPORT_PROBES, *gauss.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fraction, _ = choose_teleport_fraction(model_fn, cls(**config), gauss, nfe, probes)
    return cls(**config, teleport_stats=stats, teleport_fraction=fraction)


def _dc_scheduler(name, base, cfg, folder: Path, model, nfe):
    """":dc": the DC-Solver fit of the zoo model at this NFE."""
    import fastsample.solvers

    if not (folder / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"no DC-Solver fit for {model} at NFE {nfe} ({folder}); fit it with: "
                                f"python scripts/fit_dc.py --model {model} --nfe {nfe}")
    scheduler = fastsample.solvers.DCSolverScheduler.from_pretrained(folder)
    if scheduler.config.base_solver != DC_BASES[base] or scheduler.config.solver_order != cfg["solver_order"]:
        raise ValueError(f"{folder} holds a fit for base_solver={scheduler.config.base_solver!r}, order "
                         f"{scheduler.config.solver_order}, not {name!r}")
    return scheduler


def _learned_scheduler(cls, config, artefacts: Path, model, nfe, base, argument, weights, teleport_stats, flow):
    """":learned[-<fit>]": the learned schedule of the zoo model at this NFE, checked against ``weights``."""
    from fastsample.solvers.learned_schedule import LearnedSchedule, model_hash

    path = artefacts / "learned" / artefact_name(model) / f"{LEARNED_STEMS[base]}-nfe{nfe}{argument}.json"
    if not path.is_file():
        solver = {"DPMSolverPlusPlusScheduler": "dpmsolver++", "UniPCScheduler": "unipc", "DEISScheduler": "deis"}
        raise FileNotFoundError(f"no learned schedule for {model} at NFE {nfe} ({path}); fit it with: python "
                                f"scripts/learn_schedule.py --model {model} --scheduler {solver[cls.__name__]} "
                                f"--order {config['solver_order']} --nfe {nfe} --out {path.parent}"
                                + (" --parameterization flow" if flow else ""))
    schedule = LearnedSchedule.load(path)
    if weights is not None and schedule.model_hash != model_hash(weights):
        raise ValueError(f"{path} was learned for other weights (hash {schedule.model_hash!r}, the model's is "
                         f"{model_hash(weights)!r}): refit it")
    teleport = {}
    if schedule.extra.get("teleport_fraction"):  # fitted after a teleportation: the base teleports the same share
        teleport = {"teleport_stats": _shipped_stats(teleport_stats),
                    "teleport_fraction": schedule.extra["teleport_fraction"]}
    return schedule.scheduler(cls(**config, **teleport))


def noise_for(indices, shape, seed: int) -> torch.Tensor:
    """Per-sample noise: sample i from its own generator, whatever the batching."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices])


# ---------------------------------------------------------------------------------------------------------- rows
# A row of a sweep is a scheduler spec, held as a canonical dict (the form that enters a cell's key):
#   {"name": "unipc3:learned"}                                   a name above (or a variant, see parse_scheduler_name)
#   {"class": "diffusers.UniPCMultistepScheduler", "kwargs": {...}}   any scheduler class of diffusers or fastsample,
#                                                                on the zoo's training config updated by kwargs
#   {"folder": "learned/fmnist-large/unipc3-nfe{nfe}"}        a save_pretrained folder ("{nfe}": the cell's NFE)
# plus, on a zoo model, "tstitch": {"small": "fmnist-small", "fraction": 0.4} (the first 40% of the steps on the
# small model) and an optional display "label".  In a sweep or a plan, a dict row may also carry "nfe": [...], its
# own NFE list in place of the sweep's (not part of the spec).  On the command line a row is the name, the folder path, or
# "diffusers.UniPCMultistepScheduler{\"solver_order\": 2}" (the class, then its keyword arguments as JSON).
SPEC_KINDS = ("name", "class", "folder")
SCHEDULER_MODULES = ("fastsample.solvers", "diffusers")


def _scheduler_class(qualified: str):
    import importlib

    module, _, cls_name = str(qualified).rpartition(".")
    if module not in SCHEDULER_MODULES:
        raise ValueError(f"a row's class must be <module>.<SchedulerClass> with module in {SCHEDULER_MODULES}, "
                         f"got {qualified!r}")
    cls = getattr(importlib.import_module(module), cls_name, None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise ValueError(f"{qualified!r} is not a scheduler class of {module}")
    return cls


def normalize_spec(spec) -> dict:
    """A row (a string or a dict, see above) as its canonical dict; a clear error for anything else."""
    if isinstance(spec, str):
        text = spec.strip()
        head = text.split("{", 1)[0]
        if "{" in text and "." in head and "/" not in head:
            try:
                kwargs = json.loads(text[len(head):])
            except json.JSONDecodeError as e:
                raise ValueError(f"row {spec!r}: the keyword arguments after the class must be a JSON object ({e})") \
                    from None
            spec = {"class": head, "kwargs": kwargs}
        elif "/" in text:
            spec = {"folder": text}
        else:
            spec = {"name": text}
    if not isinstance(spec, dict):
        raise ValueError(f"a row must be a string or a dict, got {type(spec).__name__}: {spec!r}")
    unknown = set(spec) - {"name", "class", "kwargs", "folder", "tstitch", "label"}
    kinds = [k for k in SPEC_KINDS if k in spec]
    if unknown or len(kinds) != 1:
        raise ValueError(f"a row needs exactly one of {SPEC_KINDS} (plus optional 'kwargs' with 'class', "
                         f"'tstitch', 'label'), got {spec!r}")
    out = {k: spec[k] for k in kinds}
    if "name" in spec and spec["name"] != FLOOR:
        parse_scheduler_name(spec["name"])
    if "class" in spec:
        _scheduler_class(spec["class"])
        kwargs = spec.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise ValueError(f"a row's kwargs must be a dict, got {kwargs!r}")
        out["kwargs"] = dict(sorted(kwargs.items()))
    elif "kwargs" in spec:
        raise ValueError(f"'kwargs' goes with 'class' only, got {spec!r}")
    if "folder" in spec and not isinstance(spec["folder"], str):
        raise ValueError(f"a row's folder must be a path string, got {spec['folder']!r}")
    if "tstitch" in spec:
        ts = spec["tstitch"]
        from . import zoo

        if (not isinstance(ts, dict) or set(ts) != {"small", "fraction"} or ts["small"] not in zoo.MODEL_CONFIGS
                or not isinstance(ts["fraction"], (int, float)) or not 0 < ts["fraction"] <= 1):
            raise ValueError(f"tstitch must be {{'small': <zoo model>, 'fraction': F}} with 0 < F <= 1 (the share of "
                             f"the steps, noisiest first, on the small model; 1: the small model alone), got {ts!r}")
        out["tstitch"] = {"small": ts["small"], "fraction": float(ts["fraction"])}
    if "label" in spec:
        out["label"] = str(spec["label"])
    return out


def spec_label(spec: dict) -> str:
    """The row's name in tables and plots."""
    if "label" in spec:
        return spec["label"]
    if "name" in spec:
        text = spec["name"]
    elif "class" in spec:
        args = ",".join(f"{k}={v}" for k, v in spec["kwargs"].items())
        text = spec["class"].replace("fastsample.solvers.", "") + (f"({args})" if args else "")
    else:
        text = Path(spec["folder"]).name
    if "tstitch" in spec:
        text += f"+tstitch({spec['tstitch']['small']}@{spec['tstitch']['fraction']:g})"
    return text


def resolve_folder(folder: str, nfe: int) -> Path:
    """A row's scheduler folder for this NFE: relative paths from the working directory, else from the checkout."""
    path = Path(folder.format(nfe=nfe))
    for candidate in (path, ARTEFACTS / path):
        if (candidate / "scheduler_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no scheduler folder {path} (no scheduler_config.json there, nor under {ARTEFACTS}); "
                            f"write one with scheduler.save_pretrained")


def build_scheduler(spec: dict, task: "Task", nfe: int):
    """The scheduler a canonical row stands for, at this NFE, for ``task``'s model."""
    if "name" in spec:
        name = FLOOR_SCHEDULER if spec["name"] == FLOOR else spec["name"]
        return make_named_scheduler(name, task.name, nfe, task.unet, teleport_stats=task.teleport_stats,
                                    model_fn=task.model, flow=task.flow)
    if "class" in spec:
        cls = _scheduler_class(spec["class"])
        return cls(**{**base_config_for(cls, task.flow), **spec["kwargs"]})
    folder = resolve_folder(spec["folder"], nfe)
    cls_name = json.loads((folder / "scheduler_config.json").read_text()).get("_class_name")
    for module in SCHEDULER_MODULES:
        try:
            cls = _scheduler_class(f"{module}.{cls_name}")
            break
        except ValueError:
            continue
    else:
        raise ValueError(f"{folder}: _class_name {cls_name!r} is not a scheduler of {SCHEDULER_MODULES}")
    return cls.from_pretrained(folder)


def digest(obj) -> str:
    """The 16-hex-digit key of a JSON-able object (sorted keys): a results cell's key.  Anything JSON cannot write
    enters by its repr, which is only as stable as that repr: pass numbers, strings, lists and dicts."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def config_digest(scheduler) -> str:
    """A hash of everything that decides how ``scheduler`` samples: its class, its config (learned timesteps and
    scales, DC ratios, CPR, teleport options, ...) and the contents of the files its config names (teleport
    statistics) in place of their paths, so the key is the same in any checkout."""
    cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    from .zoo import resolve_artefact

    for k, v in cfg.items():
        v = resolve_artefact(v) if isinstance(v, str) else v
        if isinstance(v, str) and v.endswith((".safetensors", ".json")) and Path(v).is_file():
            cfg[k] = "file sha256 " + hashlib.sha256(Path(v).read_bytes()).hexdigest()[:16]
    return digest({"class": f"{type(scheduler).__module__.split('.')[0]}.{type(scheduler).__name__}", "config": cfg})


# ---------------------------------------------------------------------------------------------------------- tasks
class Task:
    """What is sampled and how it is scored.

    A zoo model: metric "fid" (against the Fashion-MNIST train split, with a bootstrap standard error) or "rmse"
    (the trajectory error: RMSE of each end point against a converged solve from the same noise, UniPC-3 with
    ``reference_steps`` steps, cached per model weights and seed under ``cache_dir``).  The exact testbed: "rmse" or
    "trajectory_error" (relative L2), against the exact probability-flow ODE solution over the interval the scheduler
    integrates."""

    def __init__(self, model: str, device="cpu", reference_steps: int = 200, cache_dir=None):
        from . import zoo
        from fastsample.solvers.learned_schedule import model_hash

        self.name, self.device = model, device
        self.flow = model.endswith(FLOW)
        base = model[: -len(FLOW)] if self.flow else model
        if not isinstance(reference_steps, int) or reference_steps < 2:
            raise ValueError(f"reference_steps must be an integer >= 2, got {reference_steps!r}")
        self.reference_steps = reference_steps
        self.cache_dir = Path(cache_dir) if cache_dir is not None else REFERENCE_CACHE
        self._small = {}
        if model == TESTBED:
            from .metrics import tensor_digest
            from .schedules import DiscreteVP, make_betas
            from .testbeds import GaussianMixture
            from fastsample.solvers.teleport import GaussianStats

            self.testbed = GaussianMixture.random(dim=16, components=6, seed=0, schedule=DiscreteVP(make_betas()))
            self.shape, self.metrics, self.model, self.unet = (16,), ("trajectory_error", "rmse"), self.testbed, None
            self.weights = tensor_digest(self.testbed.means, self.testbed.covs, self.testbed.weights)
            self._exact = {}  # (noise digest, sigma_from, sigma_to) -> exact ODE end point, shared by the cells
            self._stats_dir = tempfile.TemporaryDirectory()  # the mixture's exact moments, for ":teleport<F>"
            self.teleport_stats = Path(self._stats_dir.name) / "testbed-gaussian.safetensors"
            mean, cov = self.testbed.moments()
            evals, evecs = torch.linalg.eigh(cov)
            GaussianStats(mean, evecs.flip(1).contiguous(), evals.flip(0).clamp_min(0).contiguous(),
                          self.shape).save(self.teleport_stats)
            return
        if base not in zoo.MODEL_CONFIGS:
            raise ValueError(f"model must be one of {(TESTBED,) + tuple(zoo.MODEL_CONFIGS)}, or a zoo model with "
                             f"{FLOW!r} (its flow view), got {model!r}")
        if zoo.MODEL_CONFIGS[base][1]:
            raise ValueError(f"model {model!r} is class-conditional; sweep an unconditional one "
                             f"({', '.join(n for n, c in zoo.MODEL_CONFIGS.items() if not c[1])})")
        self.unet = zoo.load(base, device=device, parameterization="flow" if self.flow else "epsilon")
        self.teleport_stats = None
        self.weights = model_hash(self.unet)
        self.shape, self.metrics = (1, 32, 32), ("fid", "rmse")
        self.model = model_fn(self.unet)

    @property
    def metric(self) -> str:
        """The default metric: FID on a zoo model, trajectory error on the testbed."""
        return self.metrics[0]

    def check_metric(self, metric: str | None) -> str:
        metric = self.metric if metric is None else metric
        if metric not in self.metrics:
            raise ValueError(f"metric must be one of {self.metrics} for model {self.name!r}, got {metric!r}")
        return metric

    def model_for(self, spec: dict):
        """``(model function, weights digest)`` for a row: this task's model, or the T-Stitch pair it names."""
        if "tstitch" not in spec:
            return self.model, self.weights
        if self.unet is None:
            raise ValueError(f"a tstitch row needs a zoo model, got model {self.name!r}")
        from . import zoo
        from fastsample.guidance.tstitch import StitchedModel
        from fastsample.solvers.learned_schedule import model_hash

        small = spec["tstitch"]["small"]
        if small not in self._small:
            self._small[small] = zoo.load(small, device=self.device, parameterization="flow" if self.flow else "epsilon")
        fraction = spec["tstitch"]["fraction"]
        stitched = self._small[small] if fraction == 1 else StitchedModel([self._small[small], self.unet], [fraction])
        fn = model_fn(stitched)
        fn.small_steps = (lambda timesteps: len(timesteps)) if fraction == 1 else \
            (lambda timesteps: sum(stitched.route(t) == 0 for t in timesteps))
        return fn, digest([self.weights, model_hash(self._small[small])])

    def identity(self, metric: str) -> dict:
        """What the metric's value depends on besides the row: the converged solve's step count for "rmse"."""
        return {"reference_steps": self.reference_steps} if metric == "rmse" and self.unet is not None else {}

    def reference(self, num: int, seed: int, batch_size: int = 250, log=None) -> torch.Tensor:
        """The converged end points of samples 0..num-1 of ``seed``: UniPC-3 at ``reference_steps`` steps from the
        same noise, computed once a chunk of ``batch_size`` at a time and kept (atomically) in the cache, so a
        kill loses at most the chunk in progress."""
        from safetensors.torch import load_file

        from .results import save_tensors_atomic

        path = self.cache_dir / (f"{artefact_name(self.name)}-{self.weights}-seed{seed}-unipc3x"
                                 f"{self.reference_steps}.safetensors")
        have = load_file(str(path))["x"] if path.is_file() else torch.zeros(0, *self.shape)
        while len(have) < num:
            idx = range(len(have), min(num, len(have) + batch_size))
            start = time.time()
            with torch.no_grad():
                x, _ = sample(self.model, noise_for(idx, self.shape, seed).to(self.device),
                              make_named_scheduler(FLOOR_SCHEDULER, flow=self.flow), self.reference_steps,
                              progress=False)
            have = torch.cat([have, x.float().cpu()])
            save_tensors_atomic({"x": have}, path)
            if log:
                log(f"reference {path.name}: {len(have)} of {num} ({time.time() - start:.1f} s)")
        return have[:num]

    def score(self, metric: str, samples: torch.Tensor, noise: torch.Tensor, scheduler, seed: int,
              log=None) -> tuple[float, float | None]:
        """``(value, standard error)`` of ``metric`` for the samples drawn from ``noise``."""
        from .metrics import fid_with_se, rmse_with_se, trajectory_error_with_se

        if metric == "fid":
            return fid_with_se(samples.cpu())
        if self.unet is not None:
            return rmse_with_se(samples.cpu(), self.reference(len(samples), seed, log=log))
        # the testbed's reference is the exact ODE solution over the interval the scheduler integrates: from its
        # first timestep (diffusers' DDIM "leading" spacing starts below 999; a teleported schedule from the level it
        # teleported from) to its last sigma (DEIS stops at sigma_min; DDIM, with set_alpha_to_one, at clean data)
        origin = getattr(scheduler, "teleport_origin", None)
        if origin is None:
            t0 = torch.tensor(float(scheduler.timesteps[0]), dtype=torch.float64)
            alpha0 = float(self.testbed.schedule.alpha_sigma(t0)[0])
            s0 = math.sqrt(1 - alpha0 ** 2) / alpha0
        else:
            alpha0, s0 = float(origin[0]), float(origin[1] / origin[0])
        s1 = float(scheduler.sigmas[-1]) if hasattr(scheduler, "sigmas") else 0.0
        x_T = noise.double()
        key = (hash(x_T.numpy().tobytes()), s0, s1)
        if key not in self._exact:  # rtol 1e-9: far below any error a cell measures
            self._exact[key] = self.testbed.exact_solution(x_T, s0, s1, alpha0, 1 / math.sqrt(1 + s1 ** 2), rtol=1e-9)
        pair = (samples, self._exact[key])
        return rmse_with_se(*pair) if metric == "rmse" else trajectory_error_with_se(*pair)


class _OneProcess:
    num_processes, process_index, is_main_process = 1, 0, True


def cell(task: Task, spec, nfe: int, num: int, seed: int = 0, metric: str | None = None):
    """``(scheduler, model function, identity)`` of one cell; ``identity["key"]`` is the hash of everything that
    decides its result: the model and its weights, the row and its scheduler's config, NFE, sample count, seed and
    metric (with what the metric depends on)."""
    spec = normalize_spec(spec)
    metric = task.check_metric(metric)
    scheduler = build_scheduler(spec, task, nfe)
    model, weights = task.model_for(spec)
    ident = {"model": task.name, "weights": weights, "spec": spec, "config": config_digest(scheduler), "nfe": nfe,
             "num": num, "seed": seed, "metric": metric, **task.identity(metric)}
    return scheduler, model, {"key": digest(ident), **ident}


def run_cell(task: Task, spec, nfe: int, num: int, seed: int = 0, batch_size: int = 250, acc=None,
             metric: str | None = None, log=None, prepared=None) -> dict:
    """Sample ``num`` images (this process's shard of them under accelerate) and score them: one JSONL record.
    ``prepared``: this cell's ``cell(...)`` when already built (a ":teleport-auto" row calls the model to build)."""
    acc = acc or _OneProcess()
    scheduler, model, ident = prepared or cell(task, spec, nfe, num, seed, metric)
    mine = list(range(acc.process_index, num, acc.num_processes))
    outs, calls, start = [], 0, time.time()
    for b in range(0, len(mine), batch_size):
        idx = mine[b:b + batch_size]
        noise = noise_for(idx, task.shape, seed).to(task.device)
        if hasattr(scheduler, "prepare_latents"):  # teleported: the closed-form jump (the zoo's VP: init sigma 1)
            noise = scheduler.prepare_latents(noise, nfe)
        with torch.no_grad():
            x, calls = sample(model, noise, scheduler=scheduler, num_inference_steps=nfe, progress=False)
        outs.append(torch.cat([torch.tensor(idx, dtype=torch.float64).view(-1, 1), x.double().flatten(1).cpu()], 1))
    width = 1 + math.prod(task.shape)
    local = torch.cat(outs) if outs else torch.zeros(0, width, dtype=torch.float64)
    if acc.num_processes > 1:  # shards differ in size by at most one: pad with index -1, gather, drop the padding
        pad = torch.full((math.ceil(num / acc.num_processes) - len(local), width), -1.0, dtype=torch.float64)
        gathered = acc.gather(torch.cat([local, pad]).to(acc.device)).cpu()
        local = gathered[gathered[:, 0] >= 0]
    local = local[local[:, 0].argsort()]
    family = "diffusers" if type(scheduler).__module__.startswith("diffusers") else "fastsample"
    record = {**ident, "scheduler": spec_label(ident["spec"]), "family": family, "model_calls": calls,
              "seconds": round(time.time() - start, 1)}
    if hasattr(model, "small_steps"):  # T-Stitch: how many of the calls the small model served
        record["small_calls"] = int(model.small_steps(scheduler.timesteps))
    if acc.is_main_process:
        samples = local[:, 1:].reshape(-1, *task.shape).float()
        value, se = task.score(ident["metric"], samples, noise_for(range(num), task.shape, seed), scheduler, seed, log)
        record[ident["metric"]], record["se"] = value, se
    return record


def run_sweep(model: str, schedulers, nfes, num: int, out, seed: int = 0, batch_size: int = 250,
              floor_nfe: int | None = None, device="cpu", acc=None, log=print, metric: str | None = None,
              reference_steps: int = 200, task: Task | None = None) -> list[dict]:
    """Every (row, NFE) cell not yet in ``out`` (by key), appended as it finishes, the floor cell last; returns the
    records of this sweep's cells, in order.  ``out`` is locked while the sweep runs."""
    from .results import ResultsFile, read_records

    # a dict row may carry its own "nfe" list (e.g. a teleported row, whose N steps make fewer model calls)
    rows = [(normalize_spec({k: v for k, v in s.items() if k != "nfe"}), s["nfe"]) if isinstance(s, dict) and "nfe" in s
            else (normalize_spec(s), nfes) for s in schedulers]
    for n in [n for _, ns in rows for n in ns] + ([floor_nfe] if floor_nfe is not None else []):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"NFE values must be integers >= 1 (every solver here takes any NFE from 1), got {n!r}")
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num (samples a cell) must be an integer >= 1, got {num!r}")
    acc = acc or _OneProcess()
    task = task or Task(model, device, reference_steps)
    metric = task.check_metric(metric)
    cells = [(s, n) for s, ns in rows for n in ns] + ([({"name": FLOOR}, floor_nfe)] if floor_nfe is not None else [])
    built = [cell(task, s, n, num, seed, metric) for s, n in cells]  # each scheduler built once
    keys = [b[2]["key"] for b in built]
    if not acc.is_main_process:  # the main process writes; the others sample their shards of the same cells
        done = {r.get("key") for r in read_records(out)}
        for (s, n), key, b in zip(cells, keys, built):
            if key not in done:
                run_cell(task, s, n, num, seed, batch_size, acc, metric, prepared=b)
        return []
    with ResultsFile(out, log=log) as f:
        for (s, n), key, b in zip(cells, keys, built):
            if key in f.keys():
                continue
            record = run_cell(task, s, n, num, seed, batch_size, acc, metric, log=log, prepared=b)
            f.append(record)
            log(json.dumps({k: v for k, v in record.items() if k not in ("spec", "weights", "config")}))
        by_key = {r.get("key"): r for r in f.records}
    return [by_key[k] for k in keys]


# ---------------------------------------------------------------------------------------------------------- output
def _metric_of(records: list[dict]) -> str:
    for r in records:
        if "metric" in r:
            return r["metric"]
    return "fid" if any("fid" in r for r in records) else "trajectory_error"


def _fmt(value: float, se) -> str:
    return f"{value:.4g}" if se is None or not math.isfinite(se) else f"{value:.4g} ± {se:.2g}"


def render(records: list[dict], plot=None, table=None, title: str | None = None) -> str:
    """A markdown table (one row per scheduler row, one column per model-call count, each value with its standard
    error) with, where both families are present, the ratio of fastsample's best to diffusers' best at each NFE;
    and, with ``plot``, a PNG of the metric against NFE on log axes with the floor as a horizontal line."""
    metric = _metric_of(records)
    by, se, family, floor = {}, {}, {}, None
    for r in records:
        if r["scheduler"] == FLOOR:
            floor = r
            continue
        calls = r.get("model_calls", r["nfe"])  # teleported: fewer model calls than steps
        by.setdefault(r["scheduler"], {})[calls] = r[metric]
        se.setdefault(r["scheduler"], {})[calls] = r.get("se")
        family[r["scheduler"]] = r.get("family", "diffusers" if r["scheduler"].startswith("diffusers") else
                                       "fastsample")
    nfes = sorted({n for vals in by.values() for n in vals})
    lines = ["| scheduler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for name, vals in by.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(vals[n], se[name][n]) if n in vals else "" for n in nfes)
                     + " |")
    if len(set(family.values())) == 2:
        best = {f: {n: min((v[n] for name, v in by.items() if family[name] == f and n in v), default=None)
                    for n in nfes} for f in ("fastsample", "diffusers")}
        ratio = [f"{best['fastsample'][n] / best['diffusers'][n]:.2f}x"
                 if best["fastsample"][n] is not None and best["diffusers"][n] else "" for n in nfes]
        lines.append("| **fastsample best / diffusers best** | " + " | ".join(ratio) + " |")
    text = (f"{title}\n\n" if title else "") + "\n".join(lines) + "\n"
    if floor is not None:
        text += (f"\nConverged floor ({FLOOR_SCHEDULER} at {floor['nfe']} NFE): {metric} "
                 f"{_fmt(floor[metric], floor.get('se'))}\n")
    if table:
        Path(table).parent.mkdir(parents=True, exist_ok=True)
        Path(table).write_text(text)
    if plot:
        _plot(plot, records, metric, by, se, family, floor, nfes, title)
    return text


def _plot(plot, records, metric, by, se, family, floor, nfes, title) -> None:
    """The PNG of ``render``: the metric against NFE on log axes, diffusers dashed, the floor as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, vals in by.items():
        xs = sorted(vals)
        dashed = family[name] == "diffusers"
        ax.errorbar(xs, [vals[x] for x in xs], yerr=[se[name][x] or 0 for x in xs], marker="x" if dashed else "o",
                    label=name, linestyle="--" if dashed else "-", capsize=2)
    if floor is not None:
        ax.axhline(floor[metric], color="k", linewidth=0.8, label=f"floor ({floor['nfe']} NFE)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the log axis' own labels would overlap them
    ax.set_xlabel("model calls (NFE)")
    ax.set_ylabel(metric)
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title or f"{records[0]['model']}: {metric} vs NFE "
                                                 f"({records[0]['num']} samples a cell)", 90)), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- plans
PLAN_KEYS = {"name", "model", "metric", "num", "seed", "nfe", "rows", "floor", "out", "table", "plot",
             "reference_steps", "batch_size", "title"}
PLAN_REQUIRED = ("name", "model", "metric", "num", "nfe", "rows", "out")
# a script block runs one of the checkout's experiment scripts, whose tables are not sweeps of rows x NFE (T-Stitch's
# timing pass, FKC's particles); each such script resumes by its own cell keys, so a rerun computes nothing either
SCRIPT_KEYS = {"name", "script", "args"}
SCRIPT_FOLDERS = ("experiments", "scripts")


def load_plan(plan) -> list[dict]:
    """The blocks of a plan: a JSON file (or its dict) ``{"blocks": [...]}``, each block one sweep with keys
    name, model, metric, num, nfe, rows and out (required) and seed, floor, table, plot, reference_steps,
    batch_size, title; or a script block ``{"name", "script", "args"}``: a resumable script of the checkout's
    experiments/ or scripts/ folder (a path relative to the checkout) and its command-line arguments."""
    source = plan
    if not isinstance(plan, dict):
        plan = json.loads(Path(plan).read_text())
    blocks = plan.get("blocks") if isinstance(plan, dict) else None
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"{source}: a plan is {{'blocks': [...]}} with at least one block")
    names = set()
    for i, b in enumerate(blocks):
        where = f"{source}, block {i} ({b.get('name', '?') if isinstance(b, dict) else b!r})"
        if not isinstance(b, dict):
            raise ValueError(f"{where}: a block must be a dict")
        if "script" in b:
            _check_script_block(b, where)
        else:
            missing, unknown = [k for k in PLAN_REQUIRED if k not in b], set(b) - PLAN_KEYS
            if missing or unknown:
                raise ValueError(f"{where}: missing keys {missing}, unknown keys {sorted(unknown)}; a block takes "
                                 f"{sorted(PLAN_KEYS)} (or, a script block, {sorted(SCRIPT_KEYS)})")
        if b["name"] in names:
            raise ValueError(f"{where}: block names must be unique")
        names.add(b["name"])
        for s in b.get("rows", ()):
            normalize_spec({k: v for k, v in s.items() if k != "nfe"} if isinstance(s, dict) else s)
    return blocks


def _check_script_block(b: dict, where: str) -> None:
    if set(b) != SCRIPT_KEYS:
        raise ValueError(f"{where}: a script block takes exactly {sorted(SCRIPT_KEYS)}, got {sorted(b)}")
    script = Path(str(b["script"]))
    if (script.is_absolute() or ".." in script.parts or not script.parts or script.parts[0] not in SCRIPT_FOLDERS
            or script.suffix != ".py"):
        raise ValueError(f"{where}: script must be a .py file of the checkout's {SCRIPT_FOLDERS} folders, given "
                         f"relative to the checkout, got {b['script']!r}")
    path = (ARTEFACTS / script).resolve()
    if not path.is_relative_to((ARTEFACTS / script.parts[0]).resolve()):
        raise ValueError(f"{where}: script {b['script']!r} leads outside the checkout's {script.parts[0]}/ folder")
    if not path.is_file():
        raise ValueError(f"{where}: no script {b['script']!r} in the checkout ({ARTEFACTS})")
    if not isinstance(b["args"], list) or not all(isinstance(a, str) for a in b["args"]):
        raise ValueError(f"{where}: args must be a list of strings, got {b['args']!r}")


def run_script_block(b: dict, log=print) -> None:
    """Run a script block with this interpreter, in the working directory (where a sweep block's ``out`` resolves
    too) and with this process's torch thread count unless its args set one; an error if the script fails."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, str(ARTEFACTS / b["script"]), *b["args"]]
    log(f"== block {b['name']}: {b['script']} {' '.join(b['args'])}")
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if done.returncode:
        raise RuntimeError(f"block {b['name']}: {b['script']} exited with status {done.returncode}")


def run_plan(plan, only=None, device="cpu", log=print) -> dict:
    """Run every block of a plan (or those named in ``only``) in order, each a resumable sweep into its ``out``,
    then write its table and plot; returns {block name: records}.  A rerun of a finished plan computes nothing."""
    blocks = load_plan(plan)
    if only:
        unknown = set(only) - {b["name"] for b in blocks}
        if unknown:
            raise ValueError(f"no blocks named {sorted(unknown)}; the plan has {[b['name'] for b in blocks]}")
        blocks = [b for b in blocks if b["name"] in only]
    tasks, results, missing, failed = {}, {}, [], []
    for b in blocks:
        if "script" in b:
            if device != "cpu":
                log(f"== block {b['name']}: a script block runs on the device its own args give, not {device!r}")
            try:
                run_script_block(b, log)
            except RuntimeError as e:  # run the other blocks, then say so
                log(f"== {e}")
                failed.append(str(e))
                continue
            results[b["name"]] = None
            continue
        steps = b.get("reference_steps", 200)
        if (b["model"], steps) not in tasks:
            tasks[b["model"], steps] = Task(b["model"], device, steps)
        log(f"== block {b['name']}: {b['model']}, {b['metric']}, {len(b['rows'])} rows x NFE {b['nfe']}")
        try:
            records = run_sweep(b["model"], b["rows"], b["nfe"], b["num"], b["out"], seed=b.get("seed", 0),
                                batch_size=b.get("batch_size", 250), floor_nfe=b.get("floor"), device=device,
                                log=log, metric=b["metric"], task=tasks[b["model"], steps])
        except FileNotFoundError as e:  # a fit the block needs is not there yet: run the other blocks, then say so
            log(f"== block {b['name']} not run: {e}")
            missing.append(f"{b['name']}: {e}")
            continue
        render(records, b.get("plot"), b.get("table"), b.get("title"))
        results[b["name"]] = records
    if failed:
        raise RuntimeError("script blocks that failed (the others finished):\n" + "\n".join(failed + missing))
    if missing:
        raise FileNotFoundError("blocks not run for want of a fit (the others finished):\n" + "\n".join(missing))
    return results
