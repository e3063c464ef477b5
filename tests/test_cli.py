"""Issue 20 F14, F15, F18, F19: every command line checks its arguments and its output path when it parses them,
before any work, and names the argument, the value and what is allowed.  The scripts run in this process (their
``main(argv)``): a parse error exits with status 2 before a model is loaded or a file is written."""
import argparse
import json
import os
from pathlib import Path

import pytest

from conftest import script
from fastsample import cli

ROOT = Path(__file__).resolve().parents[1]


def refused(name, argv, capsys):
    with pytest.raises(SystemExit) as e:
        script(name).main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


CASES = [  # F14: zero or negative counts crashed deep inside six scripts
    ("sample", ["--num", "0"], "argument --num: must be an integer >= 1, got 0"),
    ("sample", ["--nfe", "-3"], "argument --nfe: must be an integer >= 1, got -3"),
    ("sample", ["--size", "0"], "argument --size: must be an integer >= 8, got 0"),  # F18
    ("sample", ["--order", "4"], r"argument --order: must be an integer in \[1, 3\], got 4"),
    ("fid_sweep", ["--num", "0"], "argument --num: must be an integer >= 2, got 0"),
    ("fid_sweep", ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    ("fid_sweep", ["--nfe", "5", "x"], "argument --nfe: must be an integer, got 'x'"),
    ("tstitch_sweep", ["--num-rmse", "-1"], "argument --num-rmse: must be an integer >= 1, got -1"),
    ("tstitch_sweep", ["--fractions", "1.5"], r"argument --fractions: must be a finite number in \[0.0, 1.0\], got 1.5"),
    ("teleport_stats", ["--probes", "0"], "argument --probes: must be an integer >= 1, got 0"),
    ("teleport_stats", ["--tol", "nan"], r"argument --tol: must be a finite number in \(0.0, inf\), got nan"),
    ("learn_schedule", ["--validation", "0"], "argument --validation: must be an integer >= 1, got 0"),
    ("learn_schedule", ["--num", "0"], "argument --num: must be an integer >= 1, got 0"),
    ("fit_dc", ["--iterations", "0"], "argument --iterations: must be an integer >= 1, got 0"),  # F19
    ("fit_dc", ["--nfe", "2"], "argument --nfe: must be an integer >= 3, got 2"),
    ("fkc_cfg_sweep", ["--particles", "0"], "argument --particles: must be an integer >= 2, got 0"),
    ("fkc_cfg_sweep", ["--equal-calls", "--methods", "fkc"], "--equal-calls adds plain CFG cells: it needs 'cfg'"),
    ("fkc_cfg_sweep", ["--clip", "1", "--methods", "cfg"], "--clip applies to FKC only"),
    ("fkc_cfg_sweep", ["--steps", "100", "--particles", "16", "--equal-calls"],
     "--steps 100 x --particles 16 = 1600 steps, more than the model's 1000 training timesteps"),
    ("fkc_testbed", ["--ess-threshold", "2"], r"argument --ess-threshold: must be a finite number in \[0.0, 1.0\]"),
    ("train_classifier", ["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    ("bench_models", ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    ("bench_overhead", ["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    # F18: flags that would be ignored silently
    ("learn_schedule", ["--method", "dp", "--scales"], "--scales apply to --method gradient only"),
    ("learn_schedule", ["--iterations", "5", "--lr", "0.1"], "--iterations, --lr apply to --method gradient only"),
    ("learn_schedule", ["--method", "gradient", "--teleport-fraction", "0"], "a fraction in \\(0, 1\\)"),  # before the teachers
    ("teleport_stats", ["--nfe", "5"], "--nfe choose the teleport fraction for --model, which was not given"),
    ("teleport_stats", ["--data", "/nonexistent", "--out", "/tmp/fastsample-new-stats.safetensors"],
     "the Fashion-MNIST folder given"),
]


@pytest.mark.parametrize("name, argv, match", CASES, ids=[f"{c[0]}{' '.join(c[1])}" for c in CASES])
def test_bad_arguments_are_refused_before_any_work(name, argv, match, capsys):
    import re

    err = refused(name, argv, capsys)
    assert re.search(match, err), err


def test_existing_statistics_file_refuses_rank(capsys, tmp_path):
    out = tmp_path / "stats.safetensors"
    out.write_bytes(b"x")
    err = refused("teleport_stats", ["--out", str(out), "--rank", "64"], capsys)
    assert "--rank / --data only shape a new statistics file" in err


OUTPUTS = [  # F15: a bad --out was found only after the work, in four scripts
    ("sample", "--out", "{file}/sample.png", "is a file"),
    ("sample", "--out", "outputs/sample.txt", "must end in .png"),
    ("fid_sweep", "--out", "{file}/x.jsonl", "is a file"),
    ("fid_sweep", "--table", "{ro}/t.md", "is not writable"),
    ("tstitch_sweep", "--out", "{dir}", "is a folder, not a file"),
    ("tstitch_sweep", "--plot", "{file}/p.png", "is a file"),
    ("teleport_stats", "--out", "{file}/s.safetensors", "is a file"),
    ("fit_dc", "--out", "{file}", "exists and is not a folder"),
    ("learn_schedule", "--out", "{file}/sub", "is a file"),
    ("fkc_cfg_sweep", "--out", "{ro}/x.jsonl", "is not writable"),
]


@pytest.mark.parametrize("name, flag, path, match", OUTPUTS, ids=[f"{o[0]}{o[1]}" for o in OUTPUTS])
def test_bad_output_paths_are_refused_before_any_work(name, flag, path, match, capsys, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    a_dir = tmp_path / "folder.jsonl"
    a_dir.mkdir()
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root ignores the mode
        if "{ro}" in path:
            pytest.skip("running as root: a read-only folder is writable")
    err = refused(name, [flag, path.format(file=a_file, dir=a_dir, ro=read_only)], capsys)
    assert f"argument {flag}" in err and match in err, err


def test_argument_types():
    assert cli.integer(1)("3") == 3 and cli.number(0.0, 1.0)("0.5") == 0.5
    for parse, text in ((cli.integer(1), "1.5"), (cli.number(0.0, open_min=True), "0"), (cli.number(), "inf")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert cli.check_writable("/tmp/new/folder/file.txt") == Path("/tmp/new/folder/file.txt")
    assert not Path("/tmp/new").exists() or Path("/tmp/new").is_dir()  # nothing created


def test_the_fastsample_command_lists_every_subcommand_and_each_has_help(capsys):
    """`fastsample --help` lists the subcommands; each one's --help works and carries the shared options."""
    from fastsample import commands

    with pytest.raises(SystemExit) as e:
        commands.main(["--help"])
    assert e.value.code == 0
    listing = capsys.readouterr().out
    assert set(commands.COMMANDS) == {"sample", "sweep", "results", "learn-schedule", "fit-dc", "teleport-stats",
                                      "train", "bench"}
    for command in commands.COMMANDS:
        assert f"    {command}" in listing, command
        with pytest.raises(SystemExit) as e:
            commands.main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: fastsample {command}") and "--threads" in text, command
        assert ("--seed" in text) == ("seed" in getattr(commands.module(command), "SHARED", commands.SHARED)), command


def test_the_console_script_is_declared_and_the_scripts_run_the_same_code():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fastsample"] == "fastsample.commands:main"
    from fastsample import commands

    for name, command in (("sample", "sample"), ("fid_sweep", "sweep"), ("learn_schedule", "learn-schedule"),
                          ("fit_dc", "fit-dc"), ("teleport_stats", "teleport-stats"), ("train", "train"),
                          ("bench_overhead", "bench")):
        assert script(name).main is commands.module(command).main, name


@pytest.mark.parametrize("argv, match", [
    (["sample", "--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (["sweep", "--num", "1"], "argument --num: must be an integer >= 2, got 1"),
    (["bench", "--seed", "3"], "unrecognized arguments: --seed 3"),  # bench times fixed tensors: no seed to ignore
    (["results", "--plan", "plans/none.json"], "plans/none.json"),
    (["nope"], "invalid choice: 'nope'"),
])
def test_the_fastsample_command_refuses_bad_input(argv, match, capsys):
    from fastsample import commands

    with pytest.raises(SystemExit) as e:
        commands.main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_a_subcommand_runs_end_to_end(tmp_path):
    """`fastsample sample` on the exact shapes model writes its grid (the console script itself, in a subprocess)."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("fastsample", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the package is not installed with its console script (pip install -e .)")
    out = tmp_path / "grid.png"
    r = subprocess.run([exe, "sample", "--model", "shapes", "--nfe", "3", "--num", "4", "--size", "8",
                        "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0


def test_learn_schedule_keeps_the_fits_it_finished(tmp_path, capsys, monkeypatch):
    """A rerun of `fastsample learn-schedule` with the same options for the same weights keeps each finished fit (a
    kill loses at most the fit in progress); other options refit."""
    from fastsample import commands
    from fastsample.commands import learn_schedule as command

    monkeypatch.setattr(command, "TEACHERS", tmp_path / "teachers")
    argv = ["learn-schedule", "--model", "fmnist-small", "--method", "gradient", "--coefficients", "--nfe", "3",
            "--num", "3", "--validation", "2", "--fine-steps", "6", "--iterations", "2", "--batch-size", "2",
            "--threads", "1", "--out", str(tmp_path / "out")]
    commands.main(argv)
    first = (tmp_path / "out" / "unipc3-nfe3-gradient-coefs.json").read_text()
    assert "kept" not in capsys.readouterr().out
    commands.main(argv)
    assert "unipc3-nfe3-gradient-coefs: kept" in capsys.readouterr().out
    assert (tmp_path / "out" / "unipc3-nfe3-gradient-coefs.json").read_text() == first
    # a fit saved before --lr-schedule existed (its command lacks the key) was fitted at the constant step size
    path = tmp_path / "out" / "unipc3-nfe3-gradient-coefs.json"
    old = json.loads(first)
    del old["extra"]["command"]["lr_schedule"]
    path.write_text(json.dumps(old))
    commands.main(argv)
    assert "unipc3-nfe3-gradient-coefs: kept" in capsys.readouterr().out
    commands.main(argv[:-2] + ["--lr-schedule", "cosine"] + argv[-2:])
    assert "kept" not in capsys.readouterr().out
    commands.main(argv[:-2] + ["--lr", "0.01"] + argv[-2:])
    assert "kept" not in capsys.readouterr().out
