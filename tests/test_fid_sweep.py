"""The quality-vs-NFE sweep (fastsample.sweep, scripts/fid_sweep.py) on the exact testbed: resumes without duplicates,
is invariant to batch size and process count, renders a table and a plot, rejects bad input; rows of every kind,
keys that keep models and configs apart, kills, truncated lines, locks and plans."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    computed = []
    again = run_sweep("testbed", SCHEDS, NFES, 12, tmp_path / "part.jsonl", batch_size=8, floor_nfe=50,
                      log=computed.append)  # nothing left to do
    assert computed == [] and again == resumed and len(read_records(tmp_path / "part.jsonl")) == len(full)
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


def test_teleport_variant_on_the_testbed():
    """":teleport<F>" on the testbed jumps in closed form with the mixture's exact moments and is scored against the
    exact solution from the level it jumped from: 20% of 10 steps teleported costs 8 model calls and matches the
    10-step error, well below 8 plain steps."""
    task = Task("testbed")
    cells = {key: run_cell(task, name, n, 64, seed=1, batch_size=64)
             for key, name, n in [("plain10", "unipc3", 10), ("tele", "unipc3:teleport0.2", 10), ("plain8", "unipc3", 8)]}
    assert cells["tele"]["model_calls"] == 8 and cells["tele"]["nfe"] == 10
    err = {k: r["trajectory_error"] for k, r in cells.items()}
    assert err["tele"] < 1.05 * err["plain10"] and err["tele"] < 0.8 * err["plain8"], err


@pytest.mark.parametrize("name, match", [
    ("unipc3:dc", "needs a zoo model's fitted artefacts"),
    ("ddim:dc", r"<base>:dc \(base in \('unipc3',\)\).*got 'ddim:dc'"),
    ("diffusers-unipc:teleport0.2", "got 'diffusers-unipc:teleport0.2'"),
    ("unipc3:teleport1.5", "0 < F < 1.*got 'unipc3:teleport1.5'"),
    ("unipc3:teleportx", "got 'unipc3:teleportx'"),
    ("unipc3:learnedgradient", "got 'unipc3:learnedgradient'"),
    ("unipc3:euler", "got 'unipc3:euler'"),
    ("diffusers-ddim:karras", "got 'diffusers-ddim:karras'"),
])
def test_variant_names_are_checked(name, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_sweep("testbed", [name], [4], 4, tmp_path / "x.jsonl")


def test_dc_and_learned_variants_load_the_fitted_artefacts(tmp_path):
    """":dc" loads <artefacts>/dc/<model>/nfe<N>-cfg1, ":learned" <artefacts>/learned/<model>/<stem>-nfe<N>.json
    and refuses a schedule learned for other weights; a missing fit names the command that makes it."""
    from fastsample import zoo
    from fastsample.solvers import DCSolverScheduler, UniPCScheduler
    from fastsample.solvers.learned_schedule import LearnedSchedule, model_hash
    from fastsample.sweep import make_named_scheduler

    ratios = [1.0, 1.0, 0.97, 1.02, 0.99]
    DCSolverScheduler(**zoo.SCHEDULER_CONFIG, dc_ratios=ratios).save_pretrained(tmp_path / "dc/fmnist-small/nfe5-cfg1")
    dc = make_named_scheduler("unipc3:dc", "fmnist-small", 5, artefacts=tmp_path)
    assert isinstance(dc, DCSolverScheduler) and list(dc.config.dc_ratios) == ratios
    with pytest.raises(FileNotFoundError, match="scripts/fit_dc.py --model fmnist-small --nfe 6"):
        make_named_scheduler("unipc3:dc", "fmnist-small", 6, artefacts=tmp_path)

    unet = zoo.load("fmnist-small")
    steps = [980, 700, 400, 150, 30]  # not the default spacing
    ref = UniPCScheduler(**zoo.SCHEDULER_CONFIG, solver_order=3)
    ref.set_timesteps(timesteps=steps)
    schedule = LearnedSchedule(steps, [float(s) for s in ref.sigmas], "UniPCScheduler", 5, "dp", 0.0, None,
                               model_hash(unet))
    (tmp_path / "learned/fmnist-small").mkdir(parents=True)
    schedule.save(tmp_path / "learned/fmnist-small/unipc3-nfe5.json")
    learned = make_named_scheduler("unipc3:learned", "fmnist-small", 5, weights=unet, artefacts=tmp_path)
    learned.set_timesteps(5)
    assert [int(t) for t in learned.timesteps] == schedule.timesteps
    with pytest.raises(ValueError, match="learned for other weights"):
        make_named_scheduler("unipc3:learned", "fmnist-small", 5, weights=zoo.load("fmnist-cond"), artefacts=tmp_path)
    with pytest.raises(FileNotFoundError, match="learn_schedule.py --model fmnist-small --scheduler dpmsolver\\+\\+"):
        make_named_scheduler("dpm++3m:learned", "fmnist-small", 5, artefacts=tmp_path)


def test_spacing_variant_is_the_scheduler_with_that_spacing():
    from fastsample import zoo
    from fastsample.solvers import UniPCScheduler
    from fastsample.sweep import make_named_scheduler

    a, b = make_named_scheduler("unipc3:karras"), UniPCScheduler(**zoo.SCHEDULER_CONFIG, solver_order=3, spacing="karras")
    plain = make_named_scheduler("unipc3")
    for sch in (a, b, plain):
        sch.set_timesteps(6)
    assert a.config.solver_order == 3 and torch.equal(a.sigmas, b.sigmas) and not torch.equal(a.sigmas, plain.sigmas)


def test_dc_with_unit_ratios_is_the_bh1_base_cell():
    """The sweep's "unipc3-bh1" is DC-Solver's base: a DC fit whose ratios are all 1 samples the same, bit for bit,
    so "unipc3:dc" against "unipc3-bh1" isolates the compensation (and "unipc3", bh2, differs)."""
    from fastsample import sample
    from fastsample.solvers import DCSolverScheduler
    from fastsample.sweep import make_named_scheduler, noise_for

    task, noise = Task("testbed"), noise_for(range(32), (16,), 0)
    dc = DCSolverScheduler.from_config(make_named_scheduler("unipc3-bh1").config, dc_ratios=[1.0] * 5)
    base = sample(task.model, noise, make_named_scheduler("unipc3-bh1"), 5, progress=False)[0]
    assert torch.equal(sample(task.model, noise, dc, 5, progress=False)[0], base)
    assert not torch.equal(sample(task.model, noise, make_named_scheduler("unipc3"), 5, progress=False)[0], base)


# ------------------------------------------------------------------ the engine: rows, keys, kills, locks, plans
def test_rows_of_every_kind_agree_and_never_share_a_cell(tmp_path):
    """A name, the same scheduler as a class with kwargs, and its save_pretrained folder sample identically; a row
    with another config, or the same row on another model, is a cell of its own."""
    from fastsample.solvers import UniPCScheduler
    from fastsample.sweep import cell, make_named_scheduler

    folder = tmp_path / "unipc2"
    UniPCScheduler.from_config(make_named_scheduler("unipc3").config, solver_order=2).save_pretrained(folder)
    rows = ["unipc3", 'fastsample.solvers.UniPCScheduler{"solver_order": 3}', {"folder": str(folder)},
            'fastsample.solvers.UniPCScheduler{"solver_order": 2}']
    out = tmp_path / "rows.jsonl"
    recs = run_sweep("testbed", rows, [5], 16, out, log=lambda _: None)
    err = [r["trajectory_error"] for r in recs]
    assert err[0] == err[1] and err[2] == err[3] and err[0] != err[2]
    assert len({r["key"] for r in recs}) == 4 and len({r["config"] for r in recs}) == 2
    assert [r["scheduler"] for r in recs] == ["unipc3", "UniPCScheduler(solver_order=3)", "unipc2",
                                              "UniPCScheduler(solver_order=2)"]
    # another metric, count, seed or NFE is another cell
    task = Task("testbed")
    keys = {cell(task, "unipc3", n, m, s, metric)[2]["key"]
            for n, m, s, metric in [(5, 16, 0, None), (6, 16, 0, None), (5, 17, 0, None), (5, 16, 1, None),
                                    (5, 16, 0, "rmse")]}
    assert len(keys) == 5
    # the same row on two zoo models: different weights, different keys
    small, large = Task("fmnist-small"), Task("fmnist-large")
    a, b = cell(small, "unipc3", 5, 8, 0, "rmse")[2], cell(large, "unipc3", 5, 8, 0, "rmse")[2]
    assert a["weights"] != b["weights"] and a["key"] != b["key"] and a["config"] == b["config"]
    # weights changed in place (a retrained model under the same name): a new key
    with torch.no_grad():
        next(small.unet.parameters()).add_(1e-3)
    small.weights = __import__("fastsample.solvers.learned_schedule", fromlist=["model_hash"]).model_hash(small.unet)
    assert cell(small, "unipc3", 5, 8, 0, "rmse")[2]["key"] != a["key"]


def test_a_learned_schedule_folder_differs_from_its_base_in_the_key(tmp_path):
    """Two folders of one class whose configs differ only in a learned schedule are two cells."""
    from fastsample.solvers import UniPCScheduler
    from fastsample.sweep import cell

    base = UniPCScheduler(solver_order=3)
    base.save_pretrained(tmp_path / "a")
    UniPCScheduler.from_config(base.config, learned_timesteps=[999, 700, 400, 150]).save_pretrained(tmp_path / "b")
    task = Task("testbed")
    ka, kb = (cell(task, {"folder": str(tmp_path / x)}, 4, 8)[2] for x in "ab")
    assert ka["config"] != kb["config"] and ka["key"] != kb["key"]


def test_a_killed_sweep_loses_at_most_the_cell_in_progress(tmp_path):
    """SIGKILL a sweep in the middle: every line left is a whole record, and the rerun computes only the rest,
    to the same values as an uninterrupted run."""
    import signal
    import time

    out = tmp_path / "k.jsonl"
    args = [sys.executable, "scripts/fid_sweep.py", "--model", "testbed", "--schedulers", "unipc3", "dpm++2m",
            "ddim", "--nfe", "3", "5", "8", "12", "20", "--num", "400", "--batch-size", "400", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(read_records(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    text = out.read_text()
    kept = read_records(out)
    assert 2 <= len(kept) and text.endswith("\n") and len(text.splitlines()) == len(kept)
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
    resumed = read_records(out)
    assert len(resumed) == 15 and resumed[:len(kept)] == kept
    full = run_sweep("testbed", ["unipc3", "dpm++2m", "ddim"], [3, 5, 8, 12, 20], 400, tmp_path / "f.jsonl",
                     batch_size=400, log=lambda _: None)
    assert [r["trajectory_error"] for r in resumed] == [r["trajectory_error"] for r in full]


def test_a_truncated_last_line_is_repaired_and_a_damaged_one_refused(tmp_path):
    from fastsample.results import ResultsFile

    out = tmp_path / "t.jsonl"
    recs = run_sweep("testbed", ["unipc3"], [3, 4], 8, out, log=lambda _: None)
    out.write_text(out.read_text() + '{"key": "abc", "model": "test')  # a write cut short by an older appender
    assert read_records(out) == recs
    said = []
    again = run_sweep("testbed", ["unipc3"], [3, 4, 5], 8, out, log=said.append)
    assert any("cut-short last line" in s for s in said) and again[:2] == recs and len(read_records(out)) == 3
    assert out.read_text().endswith("\n")
    lines = out.read_text().splitlines()
    out.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="line 2: not a JSON record"):
        with ResultsFile(out):
            pass


def test_two_writers_are_refused(tmp_path):
    from fastsample.results import ResultsFile

    out = tmp_path / "l.jsonl"
    with ResultsFile(out):
        with pytest.raises(RuntimeError, match="being written by another process"):
            run_sweep("testbed", ["unipc3"], [3], 4, out, log=lambda _: None)
        r = subprocess.run([sys.executable, "scripts/fid_sweep.py", "--model", "testbed", "--schedulers", "unipc3",
                            "--nfe", "3", "--num", "4", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and "being written by another process" in r.stderr
    assert run_sweep("testbed", ["unipc3"], [3], 4, out, log=lambda _: None)  # free again


def test_a_finished_plan_computes_nothing(tmp_path):
    from fastsample.sweep import run_plan

    plan = {"blocks": [
        {"name": "a", "model": "testbed", "metric": "rmse", "num": 16, "seed": 1, "nfe": [3, 5],
         "rows": ["unipc3", "diffusers-unipc"], "floor": 40, "out": str(tmp_path / "a.jsonl"),
         "table": str(tmp_path / "a.md")},
        {"name": "b", "model": "testbed", "metric": "trajectory_error", "num": 16, "nfe": [4],
         "rows": ["dpm++2m", {"name": "ddim", "nfe": [2, 3]}], "out": str(tmp_path / "a.jsonl")}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    said = []
    first = run_plan(tmp_path / "plan.json", log=said.append)
    assert len(first["a"]) == 5 and len(read_records(tmp_path / "a.jsonl")) == 8
    assert [(r["scheduler"], r["nfe"]) for r in first["b"]] == [("dpm++2m", 4), ("ddim", 2), ("ddim", 3)]
    assert "± " in (tmp_path / "a.md").read_text() and "fastsample best / diffusers best" in (tmp_path / "a.md").read_text()
    said.clear()
    second = run_plan(tmp_path / "plan.json", log=said.append)
    assert second == first and all(s.startswith("== block") for s in said)
    for bad, match in [({"blocks": []}, "at least one block"),
                       ({"blocks": [{**plan["blocks"][0], "colour": 1}]}, "unknown keys \\['colour'\\]"),
                       ({"blocks": [{k: v for k, v in plan["blocks"][0].items() if k != "rows"}]}, "missing keys"),
                       ({"blocks": [plan["blocks"][0], plan["blocks"][0]]}, "unique"),
                       ({"blocks": [{**plan["blocks"][0], "rows": ["nope"]}]}, "scheduler must be")]:
        with pytest.raises(ValueError, match=match):
            run_plan(bad)
    with pytest.raises(ValueError, match="no blocks named"):
        run_plan(tmp_path / "plan.json", only=["zzz"])


def test_rmse_metric_and_its_standard_error():
    """RMSE equals its definition, its jackknife error is close to the spread of per-sample errors / sqrt(n), and the
    zoo's converged reference comes from the cache on the second call (and is the 200-step UniPC-3 solve)."""
    from fastsample.metrics import rmse_with_se, trajectory_error_with_se

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 1, 4, 4, generator=g)
    x = ref + 0.1 * torch.randn(400, 1, 4, 4, generator=g)
    value, se = rmse_with_se(x, ref)
    assert value == pytest.approx(float(((x.double() - ref.double()) ** 2).mean().sqrt()), rel=1e-12)
    per = ((x - ref) ** 2).flatten(1).mean(1).double()
    assert se == pytest.approx(float(per.std() / len(per) ** 0.5 / (2 * value)), rel=0.05)
    rel, rel_se = trajectory_error_with_se(x, ref)
    assert rel == pytest.approx(float((x.double() - ref.double()).norm() / ref.double().norm()), rel=1e-12) and 0 < rel_se < rel / 10
    with pytest.raises(ValueError, match="same shape"):
        rmse_with_se(x, ref[:3])


def test_zoo_reference_is_cached_per_chunk(tmp_path):
    """The converged solve is computed once, a chunk at a time, and extended (not recomputed) for more samples."""
    from fastsample import sample
    from fastsample.sweep import make_named_scheduler, noise_for

    task = Task("fmnist-small", reference_steps=6, cache_dir=tmp_path)
    said = []
    a = task.reference(3, seed=2, batch_size=2, log=said.append)
    assert len(said) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 1
    b = task.reference(5, seed=2, batch_size=2, log=said.append)
    assert len(said) == 3 and torch.equal(b[:3], a)
    direct = sample(task.model, noise_for(range(5), task.shape, 2), make_named_scheduler("unipc3"), 6,
                    progress=False)[0]
    assert (b - direct).abs().max() < 1e-3  # float32 round-off of a different batching
    rec = run_cell(task, "unipc3", 6, 5, seed=2, metric="rmse")
    assert rec["rmse"] < 1e-4 and rec["reference_steps"] == 6


def test_teleport_auto_chooses_the_fraction_per_nfe():
    """":teleport-auto" takes the fraction that choose_teleport_fraction picks on the fitting probes, and that fraction
    enters the cell's key through the scheduler's config."""
    from fastsample.solvers.teleport import GaussianStats, choose_teleport_fraction
    from fastsample.sweep import TELEPORT_PROBES, build_scheduler, cell, make_named_scheduler

    task = Task("testbed")
    sch = build_scheduler({"name": "unipc3:teleport-auto"}, task, 10)
    probes = torch.randn(TELEPORT_PROBES, 16, generator=torch.Generator().manual_seed(0))
    expect, _ = choose_teleport_fraction(task.model, make_named_scheduler("unipc3"),
                                         GaussianStats.load(task.teleport_stats), 10, probes)
    assert sch.config.teleport_fraction == expect
    rec = run_cell(task, "unipc3:teleport-auto", 10, 16, seed=1)
    assert rec["model_calls"] == 10 - round(expect * 10)
    assert expect == pytest.approx(0.2)  # on this mixture, at the default tolerance 0.005: 2 of the 10 steps
    assert cell(task, "unipc3:teleport-auto", 10, 16, 1)[2]["config"] != cell(task, "unipc3", 10, 16, 1)[2]["config"]
    with pytest.raises(ValueError, match="diffusers-unipc:teleport-auto"):
        run_sweep("testbed", ["diffusers-unipc:teleport-auto"], [4], 4, "unused.jsonl")


def test_script_blocks_of_a_plan(tmp_path):
    """A plan's script block runs a checkout script with this interpreter; a failing one names its block; a bad
    block is refused before anything runs."""
    from fastsample.sweep import load_plan, run_plan

    ok = {"name": "help", "script": "scripts/fit_dc.py", "args": ["--help"]}
    said = []
    assert run_plan({"blocks": [ok]}, log=said.append) == {"help": None}
    assert said == ["== block help: scripts/fit_dc.py --help"]
    said.clear()
    with pytest.raises(RuntimeError, match="block bad: scripts/fit_dc.py exited with status 2"):
        run_plan({"blocks": [{**ok, "name": "bad", "args": ["--num", "0"]}, ok]}, log=said.append)
    assert said[-1] == "== block help: scripts/fit_dc.py --help"  # the blocks after a failed one still run
    for block, match in [({**ok, "script": "/etc/passwd"}, "script must be a .py file"),
                         ({**ok, "script": "experiments/../setup.py"}, "script must be a .py file"),
                         ({**ok, "script": "experiments/nope.py"}, "no script 'experiments/nope.py'"),
                         ({**ok, "script": ""}, "script must be a .py file"),
                         ({**ok, "args": "--help"}, "args must be a list of strings"),
                         ({**ok, "rows": []}, "a script block takes exactly"),
                         ({k: v for k, v in ok.items() if k != "args"}, "a script block takes exactly")]:
        with pytest.raises(ValueError, match=match):
            load_plan({"blocks": [block]})
    with pytest.raises(ValueError, match="unique"):
        load_plan({"blocks": [ok, ok]})
    assert [b["name"] for b in load_plan(ROOT / "plans" / "fmnist-large.json")][-2:] == ["tstitch", "fkc-cfg"]
