"""diffusers' own test suites for DPMSolverMultistep, DEISMultistep and UniPCMultistep, run on our classes.

The logic lives in scripts/run_diffusers_scheduler_tests.py (see its DESELECT table for what is left out and why).
It needs diffusers' test sources: $DIFFUSERS_SRC (a checkout, or a git directory read at $DIFFUSERS_REF, default
HEAD), else ``~/.cache/fastsample/diffusers-src`` (a checkout or a link to one) when it exists.  Without either the
test is skipped, and says how to set it: CI has no checkout.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "run_diffusers_scheduler_tests.py"
DEFAULT_SOURCE = Path.home() / ".cache" / "fastsample" / "diffusers-src"


def diffusers_source():
    if os.environ.get("DIFFUSERS_SRC"):
        return os.environ["DIFFUSERS_SRC"]
    return str(DEFAULT_SOURCE) if DEFAULT_SOURCE.exists() else None


@pytest.mark.skipif(diffusers_source() is None,
                    reason=f"no diffusers source: set DIFFUSERS_SRC to a diffusers checkout or git directory, or put "
                           f"(or link) one at {DEFAULT_SOURCE}")
def test_diffusers_scheduler_suites_pass_on_our_classes():
    cmd = [sys.executable, str(SCRIPT), "--diffusers-src", diffusers_source(), "-q", "-p", "no:warnings",
           "--tb=short", "--show-capture=no"]
    if os.environ.get("DIFFUSERS_REF"):
        cmd += ["--ref", os.environ["DIFFUSERS_REF"]]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"diffusers' scheduler suites failed (exit {r.returncode}):\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
