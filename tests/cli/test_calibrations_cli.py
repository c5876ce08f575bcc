"""``steindiff calibrations``: what is shipped and cached, for whom, with which options, when and how long."""

import json

import pytest

from steindiff.cli import main


def test_lists_shipped_and_cached_calibrations(tmp_path, capsys, monkeypatch):
    import steindiff.calibration as cal

    for k, v in {"n": 32, "ref_steps": 20, "max_solves": 8}.items():
        monkeypatch.setitem(cal.CALIBRATION_DEFAULTS, k, v)
    assert main(["calibrate", "--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--calibration-dir",
                 str(tmp_path), "--no-progress"]) == 0
    capsys.readouterr()
    (tmp_path / "broken.json").write_text("{")
    assert main(["calibrations", "--calibration-dir", str(tmp_path), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    shipped = [r for r in listing["calibrations"] if r["where"] == "shipped"]
    assert {r["model"] for r in shipped} == {"digits", "digits-flow", "patches"}
    assert ("patches", "dpmpp_2m", "logsnr", 8) in {(r["model"], r["solver"], r["schedule"], r["nfe"]) for r in shipped}
    assert all(r["wall_s"] > 0 and r["options"]["n"] > 0 for r in shipped)
    assert listing["sampling_defaults"]["patches"] == {"solver": "dpmpp_2m", "schedule": "logsnr", "nfe": 8, "n": 64,
                                                       "ships_calibration": True}
    assert listing["sampling_defaults"]["digits"]["ships_calibration"]
    cached = [r for r in listing["calibrations"] if r["where"] == "cache"]
    mine = next(r for r in cached if "error" not in r)
    assert (mine["model"], mine["solver"], mine["schedule"], mine["nfe"]) == ("gmm:toy2d", "euler", "karras", 3)
    assert mine["options"]["n"] == 32 and mine["fitted_at"] and mine["wall_s"] > 0
    assert mine["path"].startswith(str(tmp_path))
    assert any("corrupt" in r.get("error", "") for r in cached)
    # one model's; text for people
    assert main(["calibrations", "--calibration-dir", str(tmp_path), "--model", "gmm:toy2d"]) == 0
    text = capsys.readouterr().out
    assert "gmm:toy2d  euler" in text and "digits" not in text and "n=32 ref_steps=20 max_solves=8" in text
    assert main(["calibrations", "--calibration-dir", str(tmp_path), "--model", "patches"]) == 0
    text = capsys.readouterr().out
    assert "patches samples with dpmpp_2m / logsnr / NFE 8 unless told otherwise (a calibration ships" in text
    assert "gmm:toy2d" not in text and text.count("patches    dpmpp_2m  logsnr") == 2


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrations", "--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out
