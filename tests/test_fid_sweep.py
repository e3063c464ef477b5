"""The quality-vs-NFE sweep (fastsample.sweep, scripts/fid_sweep.py) on the exact testbed: resumes without duplicates,
is invariant to batch size and process count, renders a table and a plot, rejects bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastsample.sweep import Task, read_records, render, run_cell, run_sweep

ROOT = Path(__file__).resolve().parent.parent
SCHEDS, NFES = ["ddim", "unipc3", "diffusers-dpm++2m", "diffusers-deis"], [3, 5]


class Interrupt(Exception):
    pass


def test_interrupted_sweep_resumes_to_the_same_jsonl(tmp_path):
    full = run_sweep("testbed", SCHEDS, NFES, 12, tmp_path / "full.jsonl", batch_size=8, floor_nfe=50, log=lambda _: None)
    assert len(full) == len(SCHEDS) * len(NFES) + 1

    seen = []

    def stop_after_three(line):
        seen.append(line)
        if len(seen) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_sweep("testbed", SCHEDS, NFES, 12, tmp_path / "part.jsonl", batch_size=8, floor_nfe=50, log=stop_after_three)
    assert len(read_records(tmp_path / "part.jsonl")) == 3
    resumed = run_sweep("testbed", SCHEDS, NFES, 12, tmp_path / "part.jsonl", batch_size=8, floor_nfe=50,
                        log=lambda _: None)
    key = lambda r: (r["scheduler"], r["nfe"], r["trajectory_error"], r["model_calls"])  # noqa: E731
    assert [key(r) for r in resumed] == [key(r) for r in full]
    again = run_sweep("testbed", SCHEDS, NFES, 12, tmp_path / "part.jsonl", log=lambda _: None)  # nothing left to do
    assert len(again) == len(full)
    # the errors fall with NFE, and the floor is far below every cell
    by = {(r["scheduler"], r["nfe"]): r["trajectory_error"] for r in full}
    assert all(by[(s, 5)] < by[(s, 3)] for s in SCHEDS)
    assert by[("floor", 50)] < 0.05 * min(v for (s, _), v in by.items() if s != "floor")
    assert all(r["model_calls"] == r["nfe"] for r in full)


def test_cells_do_not_depend_on_batch_size():
    task = Task("testbed")
    a = run_cell(task, "dpm++3m", 6, 20, seed=3, batch_size=20)
    b = run_cell(task, "dpm++3m", 6, 20, seed=3, batch_size=3)
    assert a["trajectory_error"] == pytest.approx(b["trajectory_error"], rel=1e-9)


def test_render_table_and_plot(tmp_path):
    records = run_sweep("testbed", ["ddim", "unipc3"], [2, 4], 8, tmp_path / "r.jsonl", floor_nfe=20, log=lambda _: None)
    text = render(records, tmp_path / "r.png", tmp_path / "r.md")
    assert "| scheduler | NFE 2 | NFE 4 |" in text and "| unipc3 |" in text and "Converged floor" in text
    assert (tmp_path / "r.md").read_text() == text and (tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.parametrize("kw, match", [
    (dict(schedulers=["euler-x"]), "scheduler must be one of .*'unipc3'.*got 'euler-x'"),
    (dict(nfes=[0]), "NFE values must be integers >= 1"),
    (dict(model="imagenet"), "model must be one of .*'testbed'.*'fmnist-large'.*got 'imagenet'"),
    (dict(model="fmnist-cond"), "class-conditional"),
])
def test_bad_input(kw, match, tmp_path):
    args = dict(model="testbed", schedulers=["ddim"], nfes=[2], num=4, out=tmp_path / "x.jsonl")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        run_sweep(**args)


def test_command_line_rejects_unknown_scheduler(tmp_path):
    r = subprocess.run([sys.executable, "scripts/fid_sweep.py", "--model", "testbed", "--schedulers", "nope",
                        "--out", str(tmp_path / "x.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "scheduler must be one of" in r.stderr


def test_two_processes_equal_one(tmp_path):
    """accelerate launch with 2 CPU processes: each samples its shard, the main process scores: the same JSONL."""
    common = ["--model", "testbed", "--schedulers", "dpm++2m", "unipc3", "--nfe", "4", "--num", "13", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "scripts/fid_sweep.py",
                    *common, "--out", str(tmp_path / "two.jsonl")], cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "scripts/fid_sweep.py", *common, "--out", str(tmp_path / "one.jsonl")], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    one, two = read_records(tmp_path / "one.jsonl"), read_records(tmp_path / "two.jsonl")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["scheduler"] == b["scheduler"] and a["trajectory_error"] == pytest.approx(b["trajectory_error"], rel=1e-12)
