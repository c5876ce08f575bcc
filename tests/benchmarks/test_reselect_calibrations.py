"""benchmarks/reselect_calibrations.py: a saved trajectory calibration re-chosen under other guards equals
the choice fit_trajectory makes from the same candidates; bad input refused, nothing written."""

import json

import pytest

from steindiff.calibration import calibrate
from steindiff.models.registry import load_model
from steindiff.stabilizers.schedule import load_gamma_schedule
from steindiff.trajectory import choose_candidate

ALL = "residual,distribution,significance"


@pytest.fixture(scope="module")
def reselect(load_benchmark):
    return load_benchmark("reselect_calibrations")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal")
    spec = load_model("gmm:toy2d")
    sched = calibrate(spec, solver="euler", nfe=4, n=64, ref_steps=100, max_solves=20, guards=ALL.split(","))
    sched.save(folder / "toy2d-euler.json")
    return folder


def test_reselect_equals_the_fit_choice_and_is_undone_by_the_old_guards(reselect, saved, tmp_path, capsys):
    folder = tmp_path / "cal"
    folder.mkdir()
    src = (saved / "toy2d-euler.json").read_text()
    (folder / "a.json").write_text(src)
    obj = json.loads(src)
    cand = obj["calibration"]["candidates"]
    # make the residual check decide: the closest non-plain candidate fails it, and passes the others
    best = min((k for k in cand if k != "plain"), key=lambda k: cand[k]["val_rms"])
    cand[best].update(passed_residual_check=False, passed_distribution_check=True, passed_significance_check=True,
                      val_rms=0.5 * min(v["val_rms"] for v in cand.values()))
    ratio = cand[best]["val_rms"] / cand["plain"]["val_rms"]
    obj["calibration"]["chosen"] = choose_candidate(cand, ALL.split(","))
    (folder / "a.json").write_text(json.dumps(obj))
    assert reselect.main([str(folder), "--json", "--guards", "distribution,significance"]) == 0
    report = json.loads(capsys.readouterr().out)
    new = json.loads((folder / "a.json").read_text())
    assert new["calibration"]["chosen"] == best == choose_candidate(cand)
    assert report["changed"] == [{"file": "a.json", "from": obj["calibration"]["chosen"], "to": best,
                                  "val_ratio": pytest.approx(ratio)}]
    assert new["gammas"] == cand[best]["gammas"] and new["sigmas"] == cand[best]["sigmas"]
    assert new["calibration"]["reselected"]["from"] == obj["calibration"]["chosen"]
    assert load_gamma_schedule(folder / "a.json").gammas == cand[best]["gammas"]
    # the old guards give the old choice back
    assert reselect.main([str(folder), "--guards", ALL]) == 0
    back = json.loads((folder / "a.json").read_text())
    assert back["calibration"]["chosen"] == obj["calibration"]["chosen"]
    assert back["gammas"] == cand[back["calibration"]["chosen"]]["gammas"]


def test_dry_run_and_bad_input_write_nothing(reselect, saved, tmp_path, capsys):
    folder = tmp_path / "cal"
    folder.mkdir()
    src = (saved / "toy2d-euler.json").read_text()
    (folder / "a.json").write_text(src)
    assert reselect.main([str(folder), "--dry-run"]) == 0
    assert (folder / "a.json").read_text() == src and "dry run" in capsys.readouterr().out
    assert reselect.main([str(tmp_path / "empty")]) == 2
    assert "no calibration files" in capsys.readouterr().err
    assert reselect.main([str(folder), "--guards", "nope"]) == 2
    assert "unknown calibration guard(s) 'nope'" in capsys.readouterr().err
    assert (folder / "a.json").read_text() == src


def test_rescore_reproduces_the_candidates_and_records_the_rank_test(reselect, saved, tmp_path, capsys):
    """--rescore redraws the calibration noise and the reference solve, re-solves every recorded candidate
    (their validation distances must be the recorded ones) and scores them with the current checks."""
    folder = tmp_path / "cal"
    folder.mkdir()
    obj = json.loads((saved / "toy2d-euler.json").read_text())
    for v in obj["calibration"]["candidates"].values():  # a file written before the rank test
        v.pop("val_rank_z", None)
    obj["calibration"].pop("significance_test", None)
    (folder / "a.json").write_text(json.dumps(obj))
    assert reselect.main([str(folder), "--rescore", "--guards", ALL]) == 0
    new = json.loads((folder / "a.json").read_text())
    cal, was = new["calibration"], obj["calibration"]
    assert cal["rescored"] is True and cal["significance_test"] == "wilcoxon-signed-rank"
    assert cal["chosen"] == choose_candidate(cal["candidates"], ALL.split(","))
    for k, v in cal["candidates"].items():
        assert v["val_rms"] == pytest.approx(was["candidates"][k]["val_rms"], rel=1e-5)
        assert (v["val_rank_z"] is None) == (k == "plain")
    # a file whose candidates are not what it records is refused, and nothing is written
    obj["calibration"]["candidates"]["plain"]["val_rms"] *= 1.01
    src = json.dumps(obj)
    (folder / "a.json").write_text(src)
    assert reselect.main([str(folder), "--rescore"]) == 2
    assert "candidate 'plain' is not reproduced" in capsys.readouterr().err
    assert (folder / "a.json").read_text() == src
