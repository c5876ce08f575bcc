"""``steindiff bench``: outputs, stdout JSON, cost mode, --from, usage errors before any work."""

import json
import os

import pytest

from steindiff.bench.runner import GRADIENT_BUDGET
from steindiff.calibration import GRADIENT_GUARDS
from steindiff.cli import main

TINY = ["--model", "gmm:toy2d", "--solvers", "euler", "--nfe", "3", "--schedules", "karras", "--coords", "ve",
        "--stabilizers", "none,stein", "--seeds", "0", "--n", "32", "--ref-steps", "20", "--no-progress"]


def test_bench_writes_json_markdown_plots(tmp_path, capsys):
    j, md, plots = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "plots"
    assert main(["bench", *TINY, "--json-out", str(j), "--markdown", str(md), "--plots", str(plots)]) == 0
    res = json.loads(j.read_text())
    assert res["schema"] == "steindiff.bench/1" and len(res["rows"]) == 2
    assert {r["stabilizer"] for r in res["rows"]} == {"none", "stein"}
    assert res["command"].startswith("steindiff bench --model gmm:toy2d")
    assert "| solver | schedule | NFE | none | stein/ve |" in md.read_text()
    assert len(list(plots.glob("*.png"))) == 4
    out = capsys.readouterr().out
    assert "2 configurations (0 failed)" in out and f"wrote {j}" in out
    # --from rebuilds the report without sampling; --json prints the results object
    md2 = tmp_path / "again.md"
    assert main(["bench", "--from", str(j), "--markdown", str(md2), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == res["rows"] and md2.read_text() == md.read_text()


@pytest.mark.parametrize("flags", [["--json"], ["--json-out", "-"]])
def test_bench_json_to_stdout(capsys, flags):
    assert main(["bench", *TINY, *flags]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["schema"] == "steindiff.bench/1" and res["rows"][0]["status"] == "ok"


def test_bench_cost_mode(tmp_path, capsys):
    j = tmp_path / "cost.json"
    args = ["bench", *TINY, "--cost", "--cost-probes", "1,2", "--repeats", "1", "--json-out", str(j)]
    assert main(args) == 0
    res = json.loads(j.read_text())
    assert res["rows"] == [] and [(e["stabilizer"],
                                   e["probes"]) for e in res["cost"]] == [("none", None), ("stein", 1), ("stein", 2)]
    assert "stein P=2:" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [
    ["--solvers", "euler,nope"], ["--stabilizers", "none,magic"], ["--coords", "ve,xy"], ["--schedules", "cosine"],
    ["--model", "gmm:nope"], ["--nfe", "3,x"], ["--nfe", "0"], ["--seeds", ""], ["--n", "1"], ["--probes", "0"],
    ["--ref-solver", "nope"], ["--plots", "/nonexistent-dir/plots"], ["--markdown", "/nonexistent-dir/r.md"],
    ["--calibration-solves", "0"], ["--calibration-seconds", "-1"], ["--calibration-seconds", "nan"],
    ["--fit-params", "steps"], ["--fit-method", "gradient", "--fit-params", "steps,colour"],
    ["--fit-method", "gradient", "--fit-params", "steps/steps,colour"], ["--fit-start", "gits"],
    ["--calibration-guards", "residual,nope"], ["--calibration-guards", "modes:tolerance=x"],
])
def test_bad_input_exits_2_without_output(tmp_path, capsys, bad):
    j = tmp_path / "r.json"
    assert main(["bench", *TINY, "--json-out", str(j), *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("steindiff bench: error:")
    assert os.listdir(tmp_path) == []


def test_from_merges_shards_run_apart(tmp_path, capsys):
    """A grid run as two shards (one per solver) and merged equals the same grid run at once."""
    whole, a, b, merged = (tmp_path / f"{k}.json" for k in ("whole", "a", "b", "merged"))
    grid = list(TINY)
    i = grid.index("--solvers")
    assert main(["bench", *grid[:i + 1], "euler,heun", *grid[i + 2:], "--json-out", str(whole)]) == 0
    assert main(["bench", *grid[:i + 1], "euler", *grid[i + 2:], "--json-out", str(a)]) == 0
    assert main(["bench", *grid[:i + 1], "heun", *grid[i + 2:], "--json-out", str(b)]) == 0
    md = tmp_path / "merged.md"
    assert main(["bench", "--from", f"{a},{b}", "--json-out", str(merged), "--markdown", str(md)]) == 0
    w, m = json.loads(whole.read_text()), json.loads(merged.read_text())
    strip = [{k: v for k, v in r.items() if k != "wall_s_per_sample"} for r in w["rows"]]
    assert [{k: v for k, v in r.items() if k != "wall_s_per_sample"} for r in m["rows"]] == strip
    assert m["config"] == w["config"] and m["machine"]["shards"] == 2
    assert m["command"].count("steindiff bench") == 3 and "--from" in md.read_text()
    # overlapping shards are refused
    capsys.readouterr()
    assert main(["bench", "--from", f"{a},{a}"]) == 2
    assert "overlap" in capsys.readouterr().err


def test_from_rejects_other_files(tmp_path, capsys):
    f = tmp_path / "x.json"
    f.write_text('{"schema": "other"}')
    assert main(["bench", "--from", str(f)]) == 2
    assert "not a steindiff.bench/1" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--stabilizers" in out and "--cost" in out and "'-': stdout" in out


def test_recorded_command_spells_out_every_option():
    """The 'regenerate with' line names the grid options whatever the device, and the calibration cache."""
    from steindiff.cli import build_parser
    from steindiff.cli.bench import _command

    args = build_parser().parse_args(["bench", "--model", "digits", "--device", "cpu", "--mmd", "--ref-steps", "50",
                                      "--calibration-dir", "cal", "--json-out", "r.json"])
    cmd = _command(args)
    for part in ("--device cpu", "--mmd", "--ref-steps 50", "--probes 5", "--calibration-dir cal", "--json-out r.json"):
        assert part in cmd
    cost = _command(build_parser().parse_args(["bench", "--cost", "--device", "cpu"]))
    assert "--cost" in cost and "--ref-steps" not in cost


def test_calibration_budget_options_reach_the_fit_and_the_recorded_command(tmp_path):
    """--calibration-solves bounds the refinement of every cal:trajectory cell (recorded in its calibration and in
    the grid's config), and the 'regenerate with' line spells the budget out."""
    j = tmp_path / "r.json"
    args = [a if a != "none,stein" else "none,cal:trajectory" for a in TINY]
    budget = ["--calibration-solves", "6", "--calibration-seconds", "500"]
    assert main(["bench", *args, *budget, "--json-out", str(j)]) == 0
    res = json.loads(j.read_text())
    assert res["config"]["calibration"]["gmm:toy2d"]["max_solves"] == 6
    assert res["config"]["calibration"]["gmm:toy2d"]["max_seconds"] == 500
    cal = next(r for r in res["rows"] if r["stabilizer"] == "cal:trajectory")["calibration"]
    assert cal["solves"] <= 6  # two refinements of at most 6 // 2 solves each
    assert "--calibration-solves 6 --calibration-seconds 500.0" in res["command"]


def test_the_gradient_fit_runs_in_the_grid_and_in_the_cost_ratios(tmp_path, capsys):
    """--fit-method gradient --fit-params: every cal:trajectory cell is the gradient fit of those parameters
    (recorded in the grid's config, each row's calibration and the command), applied at the plain NFE."""
    j, c = tmp_path / "r.json", tmp_path / "c.json"
    args = [a if a != "none,stein" else "none,cal:trajectory" for a in TINY]
    fit = ["--fit-method", "gradient", "--fit-params", "steps,model_sigmas"]
    assert main(["bench", *args, *fit, "--json-out", str(j)]) == 0
    res = json.loads(j.read_text())
    assert res["config"]["calibration"]["gmm:toy2d"]["fit_method"] == "gradient"
    rows = [r for r in res["rows"] if r["stabilizer"] == "cal:trajectory"]
    assert rows and all(r["calibration"]["fit_method"] == "gradient" for r in rows)
    assert all(r["calibration"]["params"] == ["steps", "model_sigmas"] for r in rows)
    plain = {r["nfe_budget"]: r["nfe"] for r in res["rows"] if r["stabilizer"] == "none"}
    assert all(r["nfe"] == plain[r["nfe_budget"]] and r["extra_passes"] == 0 for r in rows)
    assert "--fit-method gradient --fit-params steps,model_sigmas" in res["command"]
    assert "gradient fit of steps+model_sigmas" in capsys.readouterr().err
    assert all(r["calibration"]["guards"] == list(GRADIENT_GUARDS) for r in rows)  # the gradient fit's default
    assert all(r["calibration"]["start"] == "gits" for r in rows)  # the default start
    s = tmp_path / "s.json"  # another start keeps the bench's Adam-step budget
    assert main(["bench", *args, *fit, "--fit-start", "plain", "--json-out", str(s)]) == 0
    res = json.loads(s.read_text())
    assert res["config"]["calibration"]["gmm:toy2d"]["gradient_options"] == {**GRADIENT_BUDGET["mixture"][
        "gradient_options"], "start": "plain"}
    rows = [r for r in res["rows"] if r["stabilizer"] == "cal:trajectory"]
    assert rows and all(r["calibration"]["start"] == "plain" for r in rows)
    assert "--fit-start plain" in res["command"]
    g = tmp_path / "g.json"
    assert main(["bench", *args, *fit, "--calibration-guards", "residual:margin=0.0,distribution", "--json-out",
                 str(g)]) == 0
    rows = [r for r in json.loads(g.read_text())["rows"] if r["stabilizer"] == "cal:trajectory"]
    assert rows and all(r["calibration"]["guards"] == ["residual:margin=0", "distribution"] for r in rows)
    assert main(["bench", *args, *fit, "--cost", "--repeats", "1", "--json-out", str(c)]) == 0
    cost = json.loads(c.read_text())["cost"]
    assert any(e["stabilizer"] == "cal:trajectory" and e["ratio"] > 0 for e in cost)


def test_auto_is_the_calibrated_sampler(tmp_path, capsys):
    """bench --stabilizers auto runs what `sample --stabilizer auto` runs: cal:trajectory, fitted once per cell;
    naming both is a duplicate, refused before any work."""
    args = [a if a != "none,stein" else "none,auto" for a in TINY]
    j = tmp_path / "r.json"
    assert main(["bench", *args, "--calibration-solves", "6", "--json-out", str(j)]) == 0
    rows = json.loads(j.read_text())["rows"]
    assert [r["stabilizer"] for r in rows] == ["none", "cal:trajectory"] and rows[1]["status"] == "ok"
    assert rows[1]["extra_passes"] == 0 and rows[1]["calibration"]["chosen"]
    assert "cal:trajectory" in capsys.readouterr().out
    dup = [a if a != "none,stein" else "auto,cal:trajectory" for a in TINY]
    assert main(["bench", *dup]) == 2
    assert "duplicate" in capsys.readouterr().err
