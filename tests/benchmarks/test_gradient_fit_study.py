"""benchmarks/gradient_fit_study.py: configurations parse (bad ones refused), a tiny study runs end to end through
the public API with every metric and writes its JSON and Markdown, shards of one model merge."""

import json

import pytest


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("gradient_fit_study")


def test_configurations_parse_and_bad_ones_are_refused(study):
    c = study.parse_config("grad:steps+history@ball=0.05@teacher=unipc:20@n=128")
    assert c["method"] == "gradient" and c["params"] == ["steps", "history"]
    assert c["ball"] == 0.05 and c["teacher"] == ("unipc", 20) and c["n"] == 128
    c = study.parse_config("grad:steps+model_sigmas@feat=0.1/1@pix=10")
    assert c["feat"] == (0.1, 1.0) and c["pix"] == 10.0
    assert study.parse_config("grad:steps@guards=distribution/significance")["guards"] == ("distribution",
                                                                                          "significance")
    assert study.parse_config("derivative-free@guards=none")["guards"] == ()
    assert study.parse_config("plain")["method"] == "plain"
    assert study.parse_config("grad:steps@start=gits")["start"] == "gits"
    for bad in ("grad:steps+warp", "magic", "grad:steps@foo=1", "derivative-free@ball=0.1",
                "grad:steps@lap=2/1/1@feat=0.5", "derivative-free@start=gits", "grad:steps@start=ld3"):
        with pytest.raises(ValueError):
            study.parse_config(bad)


def test_a_tiny_study_runs_and_merges(study, tmp_path, capsys):
    common = ["--models", "gmm:toy2d", "--schedules", "karras", "--nfe", "3", "--seeds", "0,1", "--n", "100",
              "--configs", "plain,derivative-free,grad:steps@iters=10", "--no-progress"]
    for solver in ("euler", "dpmpp_2m"):
        assert study.main([*common, "--solvers", solver, "--json-out", str(tmp_path / f"{solver}.json"),
                           "--markdown", str(tmp_path / f"{solver}.md")]) == 0
    res = json.loads((tmp_path / "euler.json").read_text())
    m = res["models"][0]
    assert m["metrics"] == list(study.MIXTURE_METRICS) and {f["config"] for f in m["fits"]} == {
        "plain", "derivative-free", "grad:steps@iters=10"}
    ok = [r for r in m["rows"] if r["config"] != "fine"]
    assert len(ok) == 2 * 3 and all(set(r["excess"]) == set(study.MIXTURE_METRICS) for r in ok)
    assert "gap_closed" in res["summary"]["gmm:toy2d"]["best"]["3"]["configs"]["grad:steps@iters=10"]
    capsys.readouterr()
    assert study.main(["--merge", str(tmp_path / "euler.json"), str(tmp_path / "dpmpp_2m.json"), "--json-out",
                       str(tmp_path / "all.json"), "--markdown", str(tmp_path / "all.md"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["gmm:toy2d"]
    assert {k.split("/")[0] for k in summary["cells"]} == {"euler", "dpmpp_2m"}
    assert "Gap closed on sw2" in (tmp_path / "all.md").read_text()
    assert study.main(["--merge", str(tmp_path / "euler.json"), str(tmp_path / "euler.json"), "--json-out",
                       str(tmp_path / "twice.json"), "--markdown", "", "--json"]) == 0
    twice = json.loads(capsys.readouterr().out)["gmm:toy2d"]  # a configuration in two shards counts once
    assert all(len(c["sw2"]["per_seed"]) == 2 for c in twice["cells"].values())
    assert study.main(["--merge", str(tmp_path / "euler.json"), "--models", "gmm:toy2d", "--json-out",
                       str(tmp_path / "kept.json"), "--markdown", "", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"gmm:toy2d"}
    assert study.main(["--merge", str(tmp_path / "euler.json"), "--models", "digits", "--json-out",
                       str(tmp_path / "none.json"), "--markdown", ""]) == 2
    assert "no runs of digits" in capsys.readouterr().err and not (tmp_path / "none.json").exists()
    assert study.main(["--configs", "nonsense"]) == 2


def test_each_models_metrics_are_the_runners(study):
    from steindiff.models.registry import ModelSpec, load_model

    assert study.metric_names(load_model("gmm:toy2d")) == study.MIXTURE_METRICS
    assert study.metric_names(load_model("digits")) == study.DIGITS_METRICS
    assert study.metric_names(load_model("patches")) == ("patch_fd", "spectrum", "pixel_sw2", "traj_err")
    spec = load_model("patches")
    with pytest.raises(ValueError, match="neither a mixture nor an image model"):
        study.metric_names(ModelSpec(name="bare", denoiser=spec.denoiser, process=spec.process,
                                     sample_shape=spec.sample_shape))
    assert study.parse_config("derivative-free@solves=40@n=128")["solves"] == 40
    assert study.parse_config("peer:ld3@iters=50")["iters"] == 50
    for bad in ("peer:gits@iters=50", "plain@solves=3", "peer:ld3@ball=1"):
        with pytest.raises(ValueError):
            study.parse_config(bad)


def test_ld3_above_the_fine_solve_and_trades_as_the_fine_solve(study):
    """Against LD3 the summary also counts the cells where LD3 is above the fine solve beyond both spreads (the
    gap's room rule), and marks each hidden trade's metric by whether the fine solve is as bad there."""
    def row(config, seed, sw2, nll, **cell):
        return {"model": "m", "seed": seed, "config": config, "excess": {"sw2": sw2, "nll": nll}, "status": "ok",
                **cell}

    rows = [row("fine", s, 0.01 + 0.001 * s, 0.5 + 0.01 * s) for s in (0, 1, 2)]
    for nfe, ld3 in ((3, 0.2), (4, 0.0105)):  # LD3 far above the fine solve at NFE 3, on it at NFE 4
        cell = {"solver": "euler", "schedule": "karras", "nfe": nfe}
        for s in (0, 1, 2):
            rows += [row("plain", s, 1.0 + 0.01 * s, 0.1 + 0.001 * s, **cell),
                     row("peer:ld3", s, ld3 + 0.001 * s, 0.1 + 0.001 * s, **cell),
                     row("grad", s, 0.05 + 0.001 * s, 0.49 + 0.001 * s, **cell)]  # NLL worse than plain, as fine
    summ = study.summarize({"models": [{"model": "m", "metrics": ["sw2", "nll"], "primary": "sw2", "rows": rows,
                                        "fits": []}]})["m"]
    v = summ["versus_ld3"]["peer:ld3"]["grad"]
    assert (v["helps"], v["above_fine"], v["helps_above_fine"]) == (1, 1, 1)
    assert v["hurts"] == 1  # at NFE 4 LD3 sits on the fine solve and grad is worse than it
    assert summ["trades"]["euler/karras/3/grad"] == {"nll": True}  # worse than plain, no worse than the fine solve
    assert study.above_fine({"mean": 0.2, "std": 0.01}, {"mean": 0.01, "std": 0.01})
    assert not study.above_fine({"mean": 0.02, "std": 0.01}, {"mean": 0.01, "std": 0.01})
    assert study.worse_than({"mean": 0.1, "std": 0.01}, {"mean": 0.5, "std": 0.01})
    assert "better where LD3 is above the fine solve" in study.markdown(
        {"command": "c", "machine": {}, "torch_threads": 1, "omp_num_threads": "1",
         "models": [{"model": "m", "metrics": ["sw2", "nll"], "primary": "sw2", "rows": rows, "fits": [],
                     "teachers": [], "reference": {}, "seeds": [0, 1, 2], "n_eval": 10}]},
        {"m": summ})
