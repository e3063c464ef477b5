"""Training helpers for the zoo's models: the learning-rate schedule, the EMA, a loss guard, and checkpoints that a
kill at any moment leaves loadable.  ``scripts/train.py`` is the command line around them.

A checkpoint is a folder of fixed names, so git tracks each file's history: ``model.safetensors`` (the network),
``ema.safetensors`` (its EMA), ``optimizer.safetensors`` (AdamW's moments; not committed) and ``state.json``.  A save
is a small journal.  Every new file is first written as ``<name>.new`` and fsynced; then ``state.json.new`` is
written atomically, and that file is the commit point: it lists the files of the new checkpoint.  Only then are the
``.new`` files renamed over the old ones, ``state.json`` last.  Opening a checkpoint finishes an interrupted save:
with a ``state.json.new`` present the renames are completed (every file it lists was complete before it was
written); without one the stray ``.new`` files are deleted and the previous checkpoint is used as it was.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from fastsample.results import write_atomic

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_at(step: int, *, lr: float, total: int, schedule: str = "cosine", final: float = 0.05, warmup: int = 0,
          warm_from: int = 0, phase_start: int = 0) -> float:
    """The learning rate of optimiser step ``step`` (0-based): a linear warmup over ``warmup`` steps from
    ``warm_from`` (where AdamW's moments started), times a decay over the phase [``phase_start``, ``total``) from
    1 to ``final`` (a fraction of ``lr``): half a cosine, a straight line, or none."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if not 0.0 <= final <= 1.0:
        raise ValueError(f"final (the last learning rate as a fraction of lr) must be in [0, 1], got {final!r}")
    if total <= phase_start:
        raise ValueError(f"total steps ({total}) must exceed the phase's first step ({phase_start})")
    warm = 1.0 if warmup <= 0 else min(1.0, (step + 1 - warm_from) / warmup)
    progress = min(1.0, max(0.0, (step - phase_start) / (total - phase_start)))
    if schedule == "constant":
        decay = 1.0
    elif schedule == "cosine":
        decay = final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - (1.0 - final) * progress
    return lr * warm * decay


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay after ``step`` optimiser steps: ``decay``, lowered early on as (1 + step) / (10 + step) so the
    average is not dominated by the initial weights."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema decay must be in [0, 1), got {decay!r}")
    return min(decay, (1 + step) / (10 + step))


class LossGuard:
    """Stops a run whose loss is not finite or has diverged: a window's mean above ``factor`` times the median of the
    last ``history`` losses.  ``check(losses)`` returns None when the window is fine, otherwise the reason."""

    def __init__(self, factor: float = 10.0, history: int = 200):
        if not factor > 1.0:
            raise ValueError(f"diverge factor must be > 1, got {factor!r}")
        self.factor, self.history, self.losses = factor, history, []

    def check(self, window: list[float]) -> str | None:
        if not window:
            return None
        bad = [x for x in window if not math.isfinite(x)]
        if bad:
            return f"the loss is not finite ({bad[0]})"
        mean = sum(window) / len(window)
        if len(self.losses) >= min(self.history, 50):
            median = sorted(self.losses)[len(self.losses) // 2]
            if mean > self.factor * median:
                return f"the loss diverged: {mean:.4g} against a recent median of {median:.4g} (factor {self.factor})"
        self.losses = (self.losses + list(window))[-self.history:]
        return None


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(out) -> None:
    """Finish or undo a save that was interrupted (see the module's docstring)."""
    out = Path(out)
    journal = out / "state.json.new"
    if journal.is_file():
        for name in json.loads(journal.read_text())["files"]:
            new = out / f"{name}.safetensors.new"
            if new.is_file():
                os.replace(new, out / f"{name}.safetensors")
        os.replace(journal, out / "state.json")
    for stray in out.glob("*.safetensors.new"):
        stray.unlink()


def save_checkpoint(out, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> None:
    """Save ``{file name: {tensor name: tensor}}`` and the JSON ``state`` as one checkpoint, atomically as a set."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recover(out)
    for name, group in tensors.items():
        new = out / f"{name}.safetensors.new"
        save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(new))
        _fsync(new)
    write_atomic(out / "state.json.new", json.dumps({**state, "files": sorted(tensors)}, indent=1))
    recover(out)


def load_state(out) -> dict | None:
    """The checkpoint's state (after finishing any interrupted save), or None when there is none."""
    out = Path(out)
    if out.is_dir():
        recover(out)
    path = out / "state.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    # the files on disk: a clone holds no optimizer moments (git does not keep them) though the state names them
    state["files"] = [n for n in state.get("files", ("model", "ema", "optimizer")) if (out / f"{n}.safetensors").is_file()]
    return state


def load_tensors(out, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / f"{name}.safetensors"))
