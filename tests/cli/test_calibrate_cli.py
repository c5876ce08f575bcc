"""``steindiff calibrate`` and ``sample --gamma-schedule`` end to end, with refusals."""

import json

from steindiff.cli import main


def test_calibrate_then_sample(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "4", "--n", "200",
                 "--ref-steps", "40", "--max-seconds", "30", "--max-solves", "12", "--out", str(out), "--json",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert all(r["solves"] <= 6 for r in summary["calibration"]["refine"].values())  # 12 solves, two refinements
    assert len(summary["gammas"]) == 4 and out.exists()
    assert main(["sample", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "4", "--n", "100",
                 "--gamma-schedule", str(out), "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["extra_passes"] == 0 and res["gammas"] == summary["gammas"]
    # flags that contradict the file are refused with a usage error naming both values, no output written
    samples = tmp_path / "s.npz"
    assert main(["sample", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "5", "--gamma-schedule", str(out),
                 "--out", str(samples), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--nfe 5 contradicts the calibration file" in err and "made for nfe 4" in err
    assert not samples.exists()
    assert main(["sample", "--model", "gmm:image64", "--solver", "euler", "--nfe", "4", "--gamma-schedule", str(out),
                 "--no-progress"]) == 2
    assert "--model gmm:image64 contradicts" in (err := capsys.readouterr().err) and "model 'gmm:toy2d'" in err
    assert main(["sample", "--solver", "heun", "--gamma-schedule", str(out), "--no-progress"]) == 2
    assert "--solver heun contradicts" in (err := capsys.readouterr().err) and "solver euler" in err


def test_calibrate_bad_input(tmp_path, capsys):
    assert main(["calibrate", "--model", "gmm:toy2d", "--objective", "variant", "--stabilizer", "nope",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown stabilizer 'nope'" in capsys.readouterr().err
    assert main(["calibrate", "--model", "gmm:toy2d", "--objective", "reference", "--out",
                 str(tmp_path / "x.json")]) == 2
    assert "needs --reference" in capsys.readouterr().err
    assert main(["calibrate", "--model", "gmm:toy2d", "--n", "3", "--out", str(tmp_path / "x.json")]) == 2
    assert "at least 4" in capsys.readouterr().err
    assert main(["calibrate", "--model", "gmm:toy2d", "--max-solves", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--max-solves >= 1" in capsys.readouterr().err
    assert main(["calibrate", "--model", "gmm:toy2d", "--guards", "distribution,nope", "--out",
                 str(tmp_path / "x.json")]) == 2
    assert "unknown calibration guard(s) 'nope'" in capsys.readouterr().err
    assert main(["calibrate", "--model", "gmm:toy2d", "--out", str(tmp_path / "nodir" / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_variant_objective_still_estimates_a_stabilizers_gammas(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--n", "100", "--objective",
                 "variant", "--stabilizer", "stein-energy", "--out", str(out), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["objective"] == "variant" and summary["variant"] == "stein-energy"
    assert summary["sigmas"] == summary["base_sigmas"]


def test_trajectory_file_carries_fitted_sigmas_into_sample(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "dpmpp_2m", "--nfe", "4", "--n", "128", "--fit",
                 "both",
                 "--ref-steps", "60", "--max-seconds", "10", "--out", str(out), "--json", "--no-progress"]) == 0
    cal = json.loads(capsys.readouterr().out)
    assert cal["objective"] == "trajectory" and cal["calibration"]["fit"] == "both"
    assert main(["sample", "--model", "gmm:toy2d", "--solver", "dpmpp_2m", "--nfe", "4", "--n", "50",
                 "--gamma-schedule", str(out), "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sigmas"] == cal["sigmas"] and res["gammas"] == cal["gammas"] and res["extra_passes"] == 0
    # a file made for other weights is refused, naming the fingerprint
    obj = json.loads(out.read_text())
    obj["fingerprint"] = "0" * 16
    out.write_text(json.dumps(obj))
    assert main(["sample", "--model", "gmm:toy2d", "--solver", "dpmpp_2m", "--nfe", "4", "--gamma-schedule", str(out),
                 "--no-progress"]) == 2
    assert "other weights" in capsys.readouterr().err


def test_sample_auto_calibrates_once_into_the_cache(tmp_path, capsys, monkeypatch):
    import steindiff.stabilizers.registry as reg

    monkeypatch.setattr(reg, "AUTO", reg.CALIBRATED)
    args = ["sample", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--n", "50", "--stabilizer", "auto",
            "--calibration-dir", str(tmp_path), "--json", "--no-progress"]
    import steindiff.calibration as cal

    real = cal.calibrate
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: real(*a, **{**k, "n": 64, "ref_steps": 40, "max_solves": 20}))
    assert main(args) == 0
    first = capsys.readouterr()
    assert "calibrating euler / karras / NFE 3 for gmm:toy2d" in first.err and len(list(tmp_path.glob("*.json"))) == 1
    assert json.loads(first.out)["stabilizer"].startswith("auto (")
    assert main(args) == 0
    second = capsys.readouterr()
    assert "calibrating" not in second.err
    assert json.loads(second.out)["sigmas"] == json.loads(first.out)["sigmas"]
    # --no-calibrate with an empty cache is the plain solver
    assert main([*args[:-4], "--calibration-dir", str(tmp_path / "empty"), "--no-calibrate", "--json",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["stabilizer"] == "auto (plain solver)"


def test_calibrate_into_the_cache_is_what_auto_then_reads(tmp_path, capsys, monkeypatch):
    """calibrate --calibration-dir with the default options writes the file under the cache's name: sample
    --stabilizer auto then uses it without calibrating (same sigmas); one made with other options it does not
    use, and says so."""
    import steindiff.calibration as cal
    import steindiff.stabilizers.registry as reg

    monkeypatch.setattr(reg, "AUTO", reg.CALIBRATED)
    for k, v in {"n": 64, "ref_steps": 40, "max_solves": 20}.items():  # small defaults, for every entry point
        monkeypatch.setitem(cal.CALIBRATION_DEFAULTS, k, v)
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--calibration-dir",
                 str(tmp_path), "--json", "--no-progress"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and fitted["out"] == str(files[0]) and fitted["key"]["model"] == "gmm:toy2d"
    sample = ["sample", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--n", "20", "--stabilizer",
              "auto", "--calibration-dir", str(tmp_path), "--json", "--no-progress"]
    assert main(sample) == 0
    out = capsys.readouterr()
    assert "calibrating" not in out.err and json.loads(out.out)["sigmas"] == fitted["sigmas"]
    other = tmp_path / "other"
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--n", "32",
                 "--calibration-dir", str(other), "--json", "--no-progress"]) == 0
    capsys.readouterr()
    assert main([*sample[:-4], "--calibration-dir", str(other), "--no-calibrate", "--json", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "n: 32 in the file, 64 requested" in out.err and json.loads(out.out)["stabilizer"] == "auto (plain solver)"
    # the cache holds trajectory calibrations only: the other objectives need --out
    assert main(["calibrate", "--model", "gmm:toy2d", "--objective", "variant", "--stabilizer", "stein",
                 "--calibration-dir", str(tmp_path), "--no-progress"]) == 2
    assert "needs --out FILE" in capsys.readouterr().err
    assert main(["calibrate", "--model", "gmm:toy2d", "--objective", "variant", "--stabilizer", "stein",
                 "--no-progress"]) == 2
    assert "needs --out FILE" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main(["calibrate", "--model", "gmm:toy2d", "--calibration-dir", str(tmp_path / "a-file"),
                 "--no-progress"]) == 2
    assert "cannot be a folder" in capsys.readouterr().err


def _small_defaults(monkeypatch):
    """Small calibration defaults for every entry point (so a fit takes a second), auto as the calibrated sampler."""
    import steindiff.calibration as cal
    import steindiff.stabilizers.registry as reg

    monkeypatch.setattr(reg, "AUTO", reg.CALIBRATED)
    for k, v in {"n": 64, "ref_steps": 40, "max_solves": 20}.items():
        monkeypatch.setitem(cal.CALIBRATION_DEFAULTS, k, v)


def test_auto_skips_a_long_fit_and_prints_the_command_that_makes_it_instant(tmp_path, capsys, monkeypatch):
    """A fit estimated longer than --quick-fit-seconds is not started: the plain solver runs, one line says so with
    the estimate and the exact `steindiff calibrate` command; that command, run as printed, fits what auto looks up
    next time (no fit, no notice)."""
    import shlex

    _small_defaults(monkeypatch)
    cache = tmp_path / "my cache"
    sample = ["sample", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--n", "20", "--stabilizer", "auto",
              "--calibration-dir", str(cache), "--quick-fit-seconds", "0.0001", "--json", "--no-progress"]
    assert main(sample) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["stabilizer"] == "auto (plain solver)" and not cache.exists()
    (line,) = out.err.strip().splitlines()
    assert line.startswith("steindiff: no calibration of euler / karras / NFE 3 for gmm:toy2d") and "about" in line
    assert "more than the 0.0001 s that if-quick allows" in line
    command = line.rsplit("): ", 1)[1]
    assert command == ("steindiff calibrate --model gmm:toy2d --solver euler --schedule karras --nfe 3 "
                       f"--calibration-dir '{cache}'")
    assert main([*shlex.split(command)[1:], "--json", "--no-progress"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["use"][0] == ("steindiff sample --model gmm:toy2d --solver euler --schedule karras --nfe 3 "
                                f"--stabilizer auto --calibration-dir '{cache}'")
    assert main(sample) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["stabilizer"] == "auto (calibrated)" and out.err == ""
    assert json.loads(out.out)["sigmas"] == fitted["sigmas"]
    # asked for, the fit runs whatever the estimate, announced with it
    assert main([*sample[:6], "4", *sample[7:], "--calibrate", "always"]) == 0
    out = capsys.readouterr()
    assert "calibrating euler / karras / NFE 4" in out.err and "measured on this machine" in out.err
    assert json.loads(out.out)["stabilizer"] == "auto (calibrated)"
    # contradictions and bad values are usage errors
    assert main([*sample, "--calibrate", "if-quick", "--no-calibrate"]) == 2
    assert "--no-calibrate contradicts --calibrate if-quick" in capsys.readouterr().err
    assert main([*sample[:-4], "--quick-fit-seconds", "0", "--no-progress"]) == 2
    assert "--quick-fit-seconds must be > 0" in capsys.readouterr().err


def test_calibrate_out_also_feeds_auto_and_the_file_sets_the_run(tmp_path, capsys, monkeypatch):
    """`calibrate --out FILE` writes the file and the cache entry auto looks up, and prints both ways to use it;
    `sample --gamma-schedule FILE` then takes the model, solver, schedule and NFE from the file."""
    _small_defaults(monkeypatch)
    out = tmp_path / "mine.json"
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "dpmpp_2m", "--schedule", "logsnr", "--nfe", "4",
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr()
    assert "steindiff: calibrating dpmpp_2m / logsnr / NFE 4 for gmm:toy2d" in text.err and "estimated" in text.out
    assert ("use it: steindiff sample --model gmm:toy2d --solver dpmpp_2m --schedule logsnr --nfe 4 --stabilizer "
            "auto\n") in text.out
    assert f"or: steindiff sample --model gmm:toy2d --gamma-schedule {out}" in text.out
    auto = ["sample", "--model", "gmm:toy2d", "--solver", "dpmpp_2m", "--schedule", "logsnr", "--nfe", "4", "--n",
            "10", "--stabilizer", "auto", "--calibrate", "never", "--json", "--no-progress"]
    assert main(auto) == 0
    res = json.loads(capsys.readouterr().out)
    fitted = json.loads(out.read_text())
    assert res["stabilizer"] == "auto (calibrated)" and res["sigmas"] == fitted["sigmas"]
    assert main(["sample", "--gamma-schedule", str(out), "--n", "10", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["model"], res["solver"], res["schedule"], res["nfe"]) == ("gmm:toy2d", "dpmpp_2m", "logsnr", 4)
    assert res["sigmas"] == fitted["sigmas"] and res["gammas"] == fitted["gammas"]
    # repeating a value of the file is fine; options other than auto's make no auto line
    assert main(["sample", "--gamma-schedule", str(out), "--nfe", "4", "--solver", "dpmpp_2m", "--n", "10",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--n", "32", "--json",
                 "--no-progress"]) == 0
    use = json.loads(capsys.readouterr().out)["use"]
    assert len(use) == 1 and "--gamma-schedule" in use[0]


def test_a_corrupt_cached_file_under_no_calibrate_is_one_line(tmp_path, capsys, monkeypatch):
    """No warning with a source line, no 'fitting it again' before running plain: one `steindiff:` line that
    says what is wrong and what happens."""
    import warnings

    _small_defaults(monkeypatch)
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--calibration-dir",
                 str(tmp_path), "--no-progress"]) == 0
    capsys.readouterr()
    (f,) = tmp_path.glob("*.json")
    f.write_text('{"schema": "steindiff.gamma-schedule/1", "gammas": [1.0,')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["sample", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--n", "10", "--stabilizer",
                     "auto", "--calibration-dir", str(tmp_path), "--no-calibrate", "--json", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert not caught and json.loads(out.out)["stabilizer"] == "auto (plain solver)"
    (line,) = out.err.strip().splitlines()
    assert line.startswith("steindiff: ignoring a cached calibration") and "corrupt or truncated" in line
    assert line.endswith("; using the plain solver") and "fitting" not in line and line.count(str(f)) == 1


def test_calibrate_out_with_no_usable_cache_writes_the_file_and_says_so(tmp_path, capsys, monkeypatch):
    _small_defaults(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the default cache cannot be made
    out = tmp_path / "c.json"
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--out", str(out), "--json",
                 "--no-progress"]) == 0
    res = capsys.readouterr()
    assert out.exists() and json.loads(res.out)["written"] == [str(out)]
    assert "the calibration cache" in res.err and "cannot be a folder" in res.err and f"writing only {out}" in res.err
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--no-progress"]) == 2
    assert "the calibration cache" in capsys.readouterr().err
