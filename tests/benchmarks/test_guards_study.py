"""benchmarks/guards_study.py: every candidate of a cell scored and labelled, the checks' counts, the choices
under each guard set equal to what the calibration chooses, and the report rebuilt from saved results."""

import json

import pytest
import torch

from steindiff.models.registry import load_model


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("guards_study")


@pytest.fixture(scope="module")
def rows(study):
    study.SETTINGS["mixture"] = {"n_cal": 64, "ref_steps": 40, "max_solves": 10, "max_seconds": 30.0, "n_eval": 200,
                                 "dtype": torch.float64}
    return study.run_model("gmm:toy2d", ["euler"], [3], "karras", [0, 1])


def test_cells_are_labelled_by_the_protocol(study, rows):
    from steindiff.bench.runner import verdict

    (row,) = rows
    assert row["kind"] == "mixture" and set(row["candidates"]) >= {"plain", "closed_form", "refined"}
    plain = row["candidates"]["plain"]["metrics"]
    assert set(plain) == {"sw2", "nll", "mode_tv"} and len(plain["sw2"]["per_seed"]) == 2
    for name, c in row["candidates"].items():
        if name == "plain":
            continue
        worse = [m for m in ("nll", "mode_tv") if verdict(plain[m], c["metrics"][m])["verdict"] == "hurts"
                 or verdict(plain[m], c["metrics"][m])["worse_at_floor"]]
        assert c["worse"] == worse and c["bad"] == bool(worse)
        assert set(c["passed"]) >= {"residual", "elbo", "modes", "distribution", "significance"}


def test_choices_follow_the_calibration_and_the_counts_add_up(study, rows):
    from steindiff.trajectory import GUARDS

    (row,) = rows
    kept = study.choices(rows, GUARDS)
    assert kept["cells"] == 1 and kept["plain"] == (row["chosen_by_record"] == "plain")
    for check in ("residual", "elbo", "distribution"):
        d = study.confusion(rows, check)
        assert d["bad"] + d["good"] == len(row["candidates"]) - 1
        assert d["rejected_bad"] + d["rejected_good"] == sum(
            not c["passed"][check] for k, c in row["candidates"].items() if k != "plain")


def test_report_from_saved_results(study, rows, tmp_path, capsys):
    part = {"schema": study.SCHEMA, "machine": {}, "config": {"models": ["gmm:toy2d"], "solvers": ["euler"],
                                                               "nfe": [3], "schedule": "karras", "seeds": [0, 1],
                                                               "settings": {"mixture": {**study.SETTINGS["mixture"],
                                                                                        "dtype": "float64"}}},
            "commands": ["python benchmarks/guards_study.py ..."], "wall_s": 1.0, "rows": rows}
    src = tmp_path / "part.json"
    src.write_text(json.dumps(part))
    out, md = tmp_path / "all.json", tmp_path / "all.md"
    assert study.main(["--from", str(src), "--json-out", str(out), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "## What the calibration keeps under each guard set" in text and "| gmm:toy2d | euler | karras | 3 |" in text
    assert json.loads(out.read_text())["analysis"]["guard_sets"]["all"]["+residual"]["cells"] == 1


def test_the_gradient_fit_is_studied_with_its_one_candidate(study, tmp_path):
    """``fit_method="gradient"``: the gradient fit of the named parameters against plain, each sampled with
    everything it fitted (its decoupled model noise levels too), and a merge refuses mixed fit methods."""
    assert study.gradient_settings(load_model("gmm:toy2d"), "mixture") == {  # the bench's calibration
        "n_cal": 512, "ref_steps": 200, "max_seconds": 600.0, "max_iters": 300, "batch_size": 64,
        "dtype": torch.float32}
    digits = study.gradient_settings(load_model("digits"), "digits")  # the bench's budget for image models
    assert (digits["max_iters"], digits["batch_size"], digits["max_seconds"]) == (150, 32, 600.0)
    study.GRADIENT_OVERRIDES["mixture"] = {"n_cal": 64, "ref_steps": 40, "max_seconds": 10.0}
    (row,) = study.run_model("gmm:toy2d", ["euler"], [3], "logsnr", [0, 1], fit_method="gradient",
                             fit_params=("steps", "model_sigmas"), budget={"max_iters": 7, "start": "plain"})
    assert row["fit_method"] == "gradient" and row["fit_params"] == ["steps", "model_sigmas"]
    assert len(row["adam_steps"]) == 2 and max(row["adam_steps"]) <= 7  # one fit per learning rate, within budget
    assert set(row["candidates"]) == {"plain", "gradient"} and row["schedule"] == "logsnr"
    grad = row["candidates"]["gradient"]
    assert set(grad["passed"]) >= {"residual", "modes", "distribution", "significance"}
    assert grad["metrics"]["sw2"]["per_seed"] != row["candidates"]["plain"]["metrics"]["sw2"]["per_seed"]
    (gits,) = study.run_model("gmm:toy2d", ["euler"], [3], "logsnr", [0], fit_method="gradient",
                              fit_params=("steps",), budget={"max_iters": 3, "start": "gits"})
    assert set(gits["candidates"]) == {"plain", "gits", "gradient"}  # GITS's levels judged as a candidate too
    assert gits["candidates"]["gits"]["metrics"]["sw2"]["per_seed"] != gits["candidates"]["plain"]["metrics"][
        "sw2"]["per_seed"]
    parts = []
    for method, rows in (("gradient", [row]), ("derivative-free", [row])):
        part = {"schema": study.SCHEMA, "machine": {}, "commands": ["..."], "wall_s": 1.0, "rows": rows,
                "config": {"models": ["gmm:toy2d"], "solvers": ["euler"], "nfe": [3], "schedule": "logsnr",
                           "seeds": [0, 1], "fit_method": method, "fit_params": ["steps", "model_sigmas"],
                           "settings": {"mixture": {**study.SETTINGS["mixture"], "dtype": "float64"}}}}
        parts.append(tmp_path / f"{method}.json")
        parts[-1].write_text(json.dumps(part))
    md = tmp_path / "one.md"
    assert study.main(["--from", str(parts[0]), "--markdown", str(md)]) == 0
    assert "the gradient fit of steps + model_sigmas" in md.read_text()
    with pytest.raises(SystemExit, match="different fit methods"):
        study.main(["--from", ",".join(map(str, parts)), "--markdown", str(tmp_path / "mixed.md")])


def test_trades_as_the_fine_solve_are_told_apart(study, rows, tmp_path):
    """A hidden trade is *as the fine solve* when every metric it makes worse than plain is no worse than the
    fine solve's from the same evaluation noise; ``--fine`` measures the fine solve and the report counts them."""
    plain, fine_recall = {"mean": -0.06, "std": 0.01}, {"mean": -0.02, "std": 0.01}
    toward = {"worse": ["recall"], "metrics": {"recall": {"mean": -0.03, "std": 0.01}}}
    beyond = {"worse": ["recall"], "metrics": {"recall": {"mean": 0.05, "std": 0.01}}}
    assert study.verdict(plain, toward["metrics"]["recall"])["worse_at_floor"]  # a trade by the protocol
    assert study.as_fine(toward, {"recall": fine_recall}) and not study.as_fine(beyond, {"recall": fine_recall})
    assert not study.as_fine(toward, None) and not study.as_fine({"worse": [], "metrics": {}}, {"recall": fine_recall})

    part = {"schema": study.SCHEMA, "machine": {}, "config": {"models": ["gmm:toy2d"], "solvers": ["euler"],
                                                               "nfe": [3], "schedule": "karras", "seeds": [0, 1],
                                                               "settings": {"mixture": {**study.SETTINGS["mixture"],
                                                                                        "dtype": "float64"}}},
            "commands": ["python benchmarks/guards_study.py ..."], "wall_s": 1.0, "rows": rows}
    src, out, md = tmp_path / "part.json", tmp_path / "fine.json", tmp_path / "fine.md"
    src.write_text(json.dumps(part))
    assert study.main(["--from", str(src), "--fine", "--json-out", str(out), "--markdown", str(md)]) == 0
    res = json.loads(out.read_text())
    fine = res["fine"]["gmm:toy2d"]
    assert set(fine) == {"sw2", "nll", "mode_tv"} and len(fine["sw2"]["per_seed"]) == 2
    assert fine["sw2"]["mean"] < rows[0]["candidates"]["plain"]["metrics"]["sw2"]["mean"]  # euler at NFE 3 is far off
    kept = res["analysis"]["guard_sets"]["all"]["+residual"]
    assert 0 <= kept["trades_as_fine"] <= kept["trades"]
    assert "## The fine solve on the evaluation noise" in md.read_text()
    again = tmp_path / "again.json"  # a merged file keeps its fine solve without measuring it again
    assert study.main(["--from", str(out), "--json-out", str(again), "--markdown", str(tmp_path / "a.md")]) == 0
    assert json.loads(again.read_text())["fine"] == res["fine"]
