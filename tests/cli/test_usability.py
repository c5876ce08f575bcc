"""What a new user trips over (issue 12): checks before any work, Ctrl-C, --help, error messages, outputs."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import steindiff.data
import steindiff.train as T
from steindiff.cli import build_parser, main
from steindiff.cli.demo import DEFAULT_OUT

ROOT = Path(__file__).resolve().parents[2]
TINY_TRAIN = ["--channels", "8", "--channel-mult", "1,2", "--attn-levels", "1", "--batch-size", "8", "--warmup", "2",
              "--no-progress"]
SAMPLE = ["sample", "--model", "gmm:toy2d", "--nfe", "3", "--n", "16", "--no-progress"]


def _subparsers() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(T, "train", refuse)
    monkeypatch.setattr(steindiff.data, "load_dataset", refuse)


# 1. train checks that it can write its checkpoint before any work ------------------------------------------


def test_train_refuses_unwritable_folder_before_any_work(tmp_path, capsys, monkeypatch):
    import steindiff.cli.train as cli_train

    _no_training(monkeypatch)

    def mkdtemp(*a, **k):  # what a read-only folder does (root ignores chmod, so simulate it)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli_train.tempfile, "mkdtemp", mkdtemp)
    assert main(["train", "--out", str(tmp_path / "ck"), "--iters", "20", *TINY_TRAIN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("steindiff train: error: cannot write checkpoint") and "not writable" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_train_refuses_read_only_folder(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["train", "--out", str(ro / "ck"), "--iters", "20", *TINY_TRAIN]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


# 3. Ctrl-C: exit 130, clean up, say what was kept -------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["sample"], ["calibrate", "--out", "x.json"], ["diagnose"], ["bench"], ["train", "--out", "ck"], ["demo"],
    ["sample-dist", "--out-dir", "d"], ["merge", "d", "--out", "x.npz"]])
def test_every_command_exits_130_on_ctrl_c(argv, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    real = build_parser

    def patched():
        parser = real()
        _sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        _sub.choices[argv[0]].set_defaults(func=interrupted)
        return parser

    monkeypatch.setattr("steindiff.cli.build_parser", patched)
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == f"steindiff {argv[0]}: interrupted"


def test_sample_ctrl_c_leaves_no_file(tmp_path, capsys, monkeypatch):
    def generate(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("steindiff.cli.sample.generate", generate)
    out = tmp_path / "s.npz"
    assert main([*SAMPLE, "--out", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_demo_ctrl_c_leaves_no_folder(tmp_path, capsys, monkeypatch):
    def generate(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("steindiff.cli.demo.generate", generate)
    assert main(["demo", "--out", str(tmp_path / "a" / "b"), "--nfe", "2", "--stabilizers", "none", "--n", "8",
                 "--no-progress"]) == 130
    assert list(tmp_path.iterdir()) == []
    # a folder that was there before stays
    (tmp_path / "mine").mkdir()
    assert main(["demo", "--out", str(tmp_path / "mine"), "--nfe", "2", "--stabilizers", "none", "--n", "8",
                 "--no-progress"]) == 130
    assert (tmp_path / "mine").is_dir()


def test_train_ctrl_c_says_where_to_resume(tmp_path, capsys, monkeypatch):
    real = T.train

    def stop_at_3(info):
        if info["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "train", lambda *a, **k: real(*a, callback=stop_at_3, **k))
    out = tmp_path / "ck"
    assert main(["train", "--out", str(out), "--iters", "10", "--ckpt-every", "100", *TINY_TRAIN]) == 130
    assert capsys.readouterr().err.strip() == \
        "steindiff train: interrupted; checkpoint saved at step 3; resume with --resume"
    monkeypatch.setattr(T, "train", real)
    assert main(["train", "--out", str(out), "--iters", "4", "--resume", "--json", *TINY_TRAIN]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["start_step"], s["step"], s["trained"]) == (3, 4, 1)


def test_sigint_exits_130(tmp_path):
    """A real Ctrl-C (SIGINT) on a running process."""
    # SIGINT restored in the child: a parent started in the background (nohup, `&`) passes it on ignored
    p = subprocess.Popen([sys.executable, "-m", "steindiff", "sample", "--model", "gmm:hd1024", "--n", "20000",
                          "--nfe", "500", "--solver", "euler", "--out", str(tmp_path / "s.npz")],
                         cwd=ROOT, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    p.stderr.read(1)  # the progress bar appeared: sampling runs
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("the sample command did not stop within 60 s of SIGINT") from None
    assert p.returncode == 130, err
    assert "steindiff sample: interrupted" in err and list(tmp_path.iterdir()) == []


# 4. train --resume past --iters ----------------------------------------------------------------------------


def test_resume_past_iters_does_nothing(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["train", "--out", str(out), "--iters", "3", *TINY_TRAIN]) == 0
    capsys.readouterr()
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    assert main(["train", "--out", str(out), "--iters", "2", "--resume", *TINY_TRAIN]) == 0
    text = capsys.readouterr().out
    assert text.startswith("nothing done: the checkpoint") and "already at step 3 (--iters 2)" in text
    assert "trained" not in text
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before
    assert main(["train", "--out", str(out), "--iters", "3", "--resume", "--json", *TINY_TRAIN]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["nothing_done"] and s["trained"] == 0 and s["step"] == 3


# 5, 6, 7. one --json convention, usage errors name the command, --help shows every default -----------------


def test_unrecognized_argument_names_the_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["merge", "shards", "--out", "m.npz", "--seed", "0"])
    assert e.value.code == 2
    assert "steindiff merge: error: unrecognized arguments: --seed 0" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(_subparsers()))
def test_help_shows_every_default(name):
    p = _subparsers()[name]
    text = re.sub(r"\s+", "", p.format_help())  # help is wrapped, also at hyphens
    for a in p._actions:
        d = a.default
        if not a.option_strings or d is None or d is False or d == "==SUPPRESS==":
            continue
        shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        line = re.sub(r"\s+", "", p._get_formatter()._format_action(a))
        assert f"(default:{shown})" in line, f"{name} {a.option_strings[0]}: default {shown!r} not shown"
        assert f"(default:{shown})" in text


def test_help_texts(capsys):
    subs = _subparsers()
    bench = re.sub(r"\s+", " ", subs["bench"].format_help())
    from steindiff.stabilizers import STABILIZERS

    for name in STABILIZERS:
        assert name in bench
    demo_solver = next(a for a in subs["demo"]._actions if "--solver" in a.option_strings)
    assert demo_solver.help and "dpmpp_2m" in demo_solver.help
    calibrate = re.sub(r"\s+", " ", subs["calibrate"].format_help())
    assert "(default: 12345)" in calibrate and "(default: the model's, else 10)" in calibrate  # shared --nfe
    train = re.sub(r"\s+", " ", subs["train"].format_help())
    assert "total training iterations (default: 6000)" in train and "(default: 1,2,2)" in train
    sample = re.sub(r"\s+", " ", subs["sample"].format_help()).replace("- ", "-")  # argparse wraps at hyphens
    assert "auto is the calibrated sampler: fitted once per model" in sample  # what --stabilizer auto means now


# 8. model names -----------------------------------------------------------------------------------------------


def _touch(path: Path, text: str = "") -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make,needle", [
    (lambda d: d / "nope", "no such folder"),
    (lambda d: d, "has no config.json"),
    (lambda d: _touch(d / "x.npz"), "is a file, not a checkpoint folder"),
    (lambda d: _touch(d / "config.json", "{}").parent, "not a steindiff checkpoint config"),
    (lambda d: _touch(d / "model_index.json", "{}").parent, "diffusers pipeline"),
])
def test_model_errors_say_what_is_missing(tmp_path, capsys, make, needle):
    path = make(tmp_path)
    assert main([*SAMPLE, "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "digits" in err and "checkpoint folder written by `steindiff train`" in err
    assert "config.json" in err


# 9. a one-sample batch with a Stein stabilizer -------------------------------------------------------------------


@pytest.mark.parametrize("extra", [["--n", "1"], ["--n", "5", "--batch-size", "2"]])
def test_one_sample_batch_suggests_per_sample(capsys, extra):
    assert main([*SAMPLE, "--stabilizer", "stein", "--probes", "1", *extra]) == 2
    assert "--per-sample" in capsys.readouterr().err


def test_per_sample_flag(capsys):
    assert main([*SAMPLE, "--stabilizer", "stein", "--probes", "1", "--n", "1", "--per-sample", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["per_sample"] and s["n"] == 1 and len(s["gammas"]) == s["steps"]


# 10. ranges checked before any work, what was used reported ---------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["--rho", "-1"], "--rho must be > 0"),
    (["--rho", "0"], "--rho must be > 0"),
    (["--solver", "heun", "--nfe", "1"], "plain Euler step; use --nfe 3 or more"),
    (["--solver", "heun", "--nfe", "2"], "plain Euler step"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_ranges_checked_before_any_work(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.setattr("steindiff.cli.sample.generate", lambda *a, **k: pytest.fail("sampling started"))
    assert main([*SAMPLE, "--out", str(tmp_path / "s.npz"), *args]) == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_demo_checks_solver_and_nfe(tmp_path, capsys):
    assert main(["demo", "--solver", "eulr", "--out", str(tmp_path / "d")]) == 2
    assert "unknown solver 'eulr'" in capsys.readouterr().err
    assert main(["demo", "--solver", "heun", "--nfe", "4,2", "--out", str(tmp_path / "d")]) == 2
    assert "--nfe 2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_nfe_and_steps_used_are_reported(capsys):
    assert main([*SAMPLE, "--solver", "heun", "--nfe", "4"]) == 0
    assert "heun / karras / stabilizer none, NFE 3 of --nfe 4 (2 steps" in capsys.readouterr().out
    assert main([*SAMPLE, "--solver", "heun", "--nfe", "4", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["nfe"], s["nfe_budget"], s["steps"]) == (3, 4, 2)


# 11, 12. output names and formats; every written file announced -----------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["--out", "d.png"], "--out 'd.png': expected a .npz file name"),
    (["--grid", "g.npz"], "--grid 'g.npz': expected a .png"),
    (["--trace", "t.npz"], "--trace 't.npz': expected a .json"),
    (["--grid", "g.png"], "--grid needs an image model"),
])
def test_output_names_checked(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    assert main([*SAMPLE, *args]) == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_grid_trace_and_out_are_written_and_announced(tmp_path, capsys):
    from PIL import Image

    out, grid, trace = tmp_path / "d.npz", tmp_path / "d.png", tmp_path / "t.json"
    assert main(["sample", "--model", "digits", "--solver", "euler", "--nfe", "2", "--n", "10", "--stabilizer", "stein",
                 "--probes", "1", "--out", str(out), "--grid", str(grid), "--trace", str(trace), "--no-progress"]) == 0
    text = capsys.readouterr().out
    for path in (out, grid, trace):
        assert f"wrote {path}" in text and path.is_file()
    with Image.open(grid) as img:  # 10 digits, 8 per row, enlarged 4x with 4-pixel gaps
        assert img.format == "PNG" and img.size == (8 * 36 + 4, 2 * 36 + 4)
    assert np.load(out)["samples"].shape == (10, 1, 8, 8)
    assert json.loads(trace.read_text())["schema"] == "steindiff.trace/1"


# 13. demo: one labelled progress bar, default folder ignored by git -------------------------------------------


def test_demo_progress_is_one_labelled_bar(tmp_path, capsys):
    assert main(["demo", "--nfe", "2", "--stabilizers", "none,stein", "--n", "8", "--out", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err
    assert "NFE 2 none" in err and "NFE 2 stein" in err and "demo dpmpp_2m" in err
    assert "dpmpp_2m:" not in err.replace("demo dpmpp_2m:", "")  # no per-solve bars
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["grid.png", "metrics.png", "results.json"]


def test_demo_default_folder_is_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert f"{DEFAULT_OUT}/" in ignored or DEFAULT_OUT in ignored
