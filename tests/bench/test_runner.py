"""Benchmark runner: schema of the rows, equal initial noise, failures recorded, the verdict rule, summary."""

import math

import pytest
import torch

from steindiff.bench import run_cost, run_grid, summarize, validate_grid, verdict
from steindiff.bench.runner import SCHEMA, excess
from steindiff.generate import generate
from steindiff.metrics import mixture_metrics
from steindiff.models.registry import load_model
from steindiff.stabilizers import STABILIZERS

GRID = dict(models=["gmm:toy2d"], solvers=["euler", "heun"], nfes=[3, 4], schedules=["karras"], coords=["ve", "vp"],
            stabilizers=["none", "stein", "stein-oracle"], seeds=[0], n=64)


@pytest.fixture(scope="module")
def result():
    return run_grid(**GRID, progress=False, ref_steps=100)


def test_schema_and_row_fields(result):
    assert result["schema"] == SCHEMA == "steindiff.bench/1"
    assert {"platform", "python", "torch", "cpu_count", "torch_threads", "wall_s_total"} <= set(result["machine"])
    assert result["config"]["reference"] == {"solver": "dpmpp_3m", "steps": 100, "schedule": "karras"}
    rows = result["rows"]
    # none once per (solver, nfe) with coords "-", each Stein variant once per coords
    assert len(rows) == 2 * 2 * (1 + 2 * 2)
    for r in rows:
        assert r["status"] == "ok", r["status"]
        assert isinstance(r["model"], str) and r["model"] == "gmm:toy2d"
        assert isinstance(r["seed"], int) and isinstance(r["nfe"], int) and isinstance(r["nfe_budget"], int)
        assert isinstance(r["extra_passes"], int)
        assert isinstance(r["wall_s_per_sample"], float) and r["wall_s_per_sample"] > 0
        assert set(r["metrics"]) >= {"sw2", "sw2_floor", "mode_tv", "mode_tv_floor", "nll", "nll_floor", "traj_err"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in r["metrics"].values())
        assert len(r["gammas"]) == r["steps"]
        if r["stabilizer"] == "none":
            assert r["coords"] == "-" and r["gammas"] == [1.0] * r["steps"] and r["gamma_raw"] == []
            assert r["extra_passes"] == 0
        else:
            assert r["coords"] in ("ve", "vp") and len(r["gamma_raw"]) == len(r["rho"]) == r["steps"]
    stein = [r for r in rows if r["stabilizer"] == "stein"]
    assert all(r["extra_passes"] == 5 * r["nfe"] and r["probes"] == 5 for r in stein)


def test_actual_nfe_and_reuse(result):
    heun = {r["nfe_budget"]: r for r in result["rows"] if r["solver"] == "heun" and r["stabilizer"] == "none"}
    assert heun[3]["nfe"] == heun[4]["nfe"] == 3  # two Heun steps: the budget of 4 buys nothing more
    assert heun[4]["reused"] and not heun[3]["reused"] and heun[4]["metrics"] == heun[3]["metrics"]
    euler = {r["nfe_budget"]: r for r in result["rows"] if r["solver"] == "euler" and r["stabilizer"] == "none"}
    assert euler[3]["nfe"] == 3 and euler[4]["nfe"] == 4


def test_same_initial_noise_as_generate(result):
    """Every configuration of a (model, seed) starts from prior_noise(seed): the vanilla row reproduces
    generate() at that seed exactly, and the trajectory error is against the same noise's reference."""
    spec = load_model("gmm:toy2d")
    gen = generate(spec, solver="euler", nfe=4, n=64, seed=0, dtype=torch.float64)
    row = next(r for r in result["rows"] if r["solver"] == "euler" and r["nfe_budget"] == 4 and r["stabilizer"]
               == "none")
    assert row["metrics"]["sw2"] == mixture_metrics(gen.x, spec.gmm, seed=0)["sw2"]
    fine = generate(spec, solver="dpmpp_3m", nfe=40, n=64, seed=0, dtype=torch.float64)
    ref = generate(spec, solver="dpmpp_3m", nfe=100, n=64, seed=0, dtype=torch.float64)
    assert float((fine.x - ref.x).pow(2).mean().sqrt()) < 0.1 * row["metrics"]["traj_err"]


class _Boom:
    """A stabilizer that raises at the second step, or returns NaN at the last step."""

    def __init__(self, mode):
        self.mode = mode

    def step(self, op, x):
        st = op(x)
        if self.mode == "raise" and op.i == 1:
            raise FloatingPointError("gamma exploded")
        x_next = st.x_next * float("nan") if (self.mode == "nan" and op.is_last) else st.x_next
        return x_next, st, {"gamma": 1.0}


def test_failing_stabilizer_is_recorded_not_fatal(monkeypatch):
    monkeypatch.setitem(STABILIZERS, "boom", lambda name, spec, **kw: _Boom("raise"))
    monkeypatch.setitem(STABILIZERS, "nan", lambda name, spec, **kw: _Boom("nan"))
    res = run_grid(["gmm:toy2d"], ["euler"], [3], ["karras"], ["ve"], ["none", "boom", "nan"], [0, 1], 32,
                   progress=False, ref_steps=20)
    by = {(r["stabilizer"], r["seed"]): r for r in res["rows"]}
    assert len(by) == 6
    for seed in (0, 1):
        assert by[("none", seed)]["status"] == "ok"
        assert by[("boom", seed)]["status"].startswith("failed: FloatingPointError: gamma exploded")
        assert by[("boom", seed)]["metrics"] == {} and by[("boom", seed)]["nfe"] is None
        assert by[("nan", seed)]["status"].startswith("failed: ValueError") and "NaN" in by[("nan", seed)]["status"]
    cells = {c["stabilizer"]: c for c in summarize(res)["cells"]}
    assert cells["boom"]["n_failed"] == 2 and cells["boom"]["excess"] == {}
    assert cells["boom"]["verdicts"]["sw2"]["verdict"] == "failed"  # vanilla at 3 Euler steps has room


def test_validate_grid_rejects_bad_names():
    ok = dict(GRID)
    for key, bad, word in [("solvers", ["euler", "nope"], "nope"), ("schedules", ["cosine"], "cosine"),
                           ("coords", ["xy"], "xy"), ("stabilizers", ["stein", "magic"], "magic"),
                           ("models", ["gmm:nope"], "nope"), ("nfes", [0], "NFE"), ("seeds", [-1], "seeds"),
                           ("solvers", ["euler", "euler"], "duplicate"), ("n", 1, "n must")]:
        with pytest.raises(ValueError, match=word):
            validate_grid(**{**ok, key: bad})


# --- the verdict rule on synthetic inputs ------------------------------------------------------
def S(mean, std=0.0):
    return {"mean": mean, "std": std}


@pytest.mark.parametrize("van, stab, expected", [
    (S(1.0, 0.01), S(0.98), "helps"),          # lower by more than the spread
    (S(1.0, 0.01), S(0.995), "tie"),           # lower, but within the spread
    (S(1.0, 0.01), S(1.025), "tie"),           # higher, within 2% of vanilla + spread (1.03)
    (S(1.0, 0.01), S(1.035), "hurts"),         # higher by more than 2% + spread
    (S(1.0, 0.05), S(0.96), "tie"),            # the spread is vanilla's seed spread
    (S(1.0, 0.05), S(0.94), "helps"),
    (S(1.0, 0.01), S(1.5, 1.0), "hurts"),      # the stabilizer's own erratic spread does not make a tie
    (S(1.0, 0.01), None, "failed"),
])
def test_verdict_help_hurt_tie(van, stab, expected):
    v = verdict(van, stab)
    assert v["verdict"] == expected and v["room"]


@pytest.mark.parametrize("stab", [S(0.001), S(50.0), None])
def test_verdict_vanilla_at_floor_is_a_tie_without_room(stab):
    """Vanilla's excess within its seed spread: a tie whatever the stabilizer does, no room."""
    v = verdict(S(0.004, 0.005), stab)
    assert v == {"verdict": "tie", "room": False, "worse_at_floor": stab is None or stab["mean"] > 1}
    assert verdict(S(-0.01, 0.0), S(-0.5))["verdict"] == "tie"  # below the floor is at the floor
    assert verdict(None, S(0.1)) == {"verdict": "n/a", "room": False, "worse_at_floor": False}


def test_excess_definitions():
    m = {"sw2": 0.3, "sw2_floor": 0.1, "nll": -2.5, "nll_floor": -2.0, "mode_tv": 0.05, "mode_tv_floor": 0.02,
         "traj_err": 0.2}
    assert excess(m, "sw2") == pytest.approx(0.2)
    assert excess(m, "nll") == pytest.approx(0.5)  # two-sided: over-concentrated samples are not better
    assert excess(m, "mode_tv") == pytest.approx(0.03)
    assert excess(m, "traj_err") == 0.2 and excess(m, "mmd") is None


def _row(solver, schedule, stab, coords, nfe, seed, sw2, floor=0.1):
    return {"model": "m", "seed": seed, "solver": solver, "schedule": schedule, "coords": coords, "stabilizer": stab,
            "nfe_budget": nfe, "nfe": nfe, "extra_passes": 0, "probes": None, "reused": False, "steps": nfe,
            "wall_s_per_sample": 1.0 if stab == "none" else 3.0, "gammas": [1.0] * nfe, "gamma_raw": [], "rho": [],
            "metrics": {"sw2": sw2, "sw2_floor": floor}, "status": "ok"}


def test_summarize_cells_best_vanilla_counts_and_cost():
    rows = []
    for seed, d in enumerate((-0.01, 0.0, 0.01)):
        rows += [_row("euler", "karras", "none", "-", 3, seed, 0.5 + d),    # room
                 _row("euler", "karras", "stein", "ve", 3, seed, 0.2 + d),   # helps
                 _row("heun", "karras", "none", "-", 3, seed, 0.3 + d),      # best vanilla at NFE 3
                 _row("heun", "karras", "stein", "ve", 3, seed, 0.9 + d),    # hurts
                 _row("euler", "karras", "none", "-", 5, seed, 0.1 + d),     # at the floor
                 _row("euler", "karras", "stein", "ve", 5, seed, 0.4 + d)]   # a tie by the floor rule
    s = summarize({"schema": SCHEMA, "rows": rows})
    cells = {(c["solver"], c["nfe_budget"], c["stabilizer"]): c for c in s["cells"]}
    e = cells[("euler", 3, "stein")]["excess"]["sw2"]
    assert e["mean"] == pytest.approx(0.1) and e["std"] == pytest.approx(0.01) and e["min"] == pytest.approx(0.09)
    assert cells[("euler", 3, "stein")]["verdicts"]["sw2"]["verdict"] == "helps"
    assert cells[("heun", 3, "stein")]["verdicts"]["sw2"]["verdict"] == "hurts"
    floor_cell = cells[("euler", 5, "stein")]["verdicts"]["sw2"]
    assert floor_cell == {"verdict": "tie", "room": False, "worse_at_floor": True}
    assert cells[("euler", 3, "stein")]["vs_best_vanilla"]["solver"] == "heun"
    assert cells[("euler", 3, "stein")]["vs_best_vanilla"]["verdict"] == "helps"
    best = {b["nfe_budget"]: b for b in s["best_vanilla"]}
    assert best[3]["solver"] == "heun" and best[5]["solver"] == "euler"
    c = s["counts"]["m"]["stein/ve"]["sw2"]
    assert (c["helps"], c["hurts"], c["tie"], c["room"], c["at_floor"]) == (1, 1, 1, 2, 1)
    assert c["helps_pct"] == 50.0  # the at-floor cell is left out
    assert s["cost"]["grid"] == [{"model": "m", "stabilizer": "stein", "probes": None, "median_ratio": 3.0,
                                  "min_ratio": 3.0, "max_ratio": 3.0, "pairs": 9}]


def test_run_cost_side_by_side():
    entries = run_cost(["gmm:toy2d"], ["euler"], [3], stabilizers=["none", "stein", "stein-sc"], probes_list=(1, 2),
                       n=16, repeats=1, progress=False)
    by = {(e["stabilizer"], e["probes"]): e for e in entries}
    assert set(by) == {("none", None), ("stein", 1), ("stein", 2), ("stein-sc", None)}
    assert by[("none", None)]["ratio"] == 1.0
    assert by[("stein", 1)]["extra_passes"] == 3 and by[("stein", 2)]["extra_passes"] == 6
    assert all(e["nfe"] == 3 and e["ratio"] > 0 for e in entries if e["stabilizer"] != "stein-sc")
    model = summarize({"schema": SCHEMA, "rows": [], "cost": entries})["cost"]["model"]
    assert len(model) == 1 and model[0]["solver"] == "euler"
    assert model[0]["a"] + model[0]["b"] == pytest.approx(by[("stein", 1)]["ratio"])


def test_calibrated_cells_fit_once_per_cell_and_apply_to_every_seed(tmp_path, monkeypatch):
    from steindiff import trajectory

    opts = {"n": 64, "ref_steps": 40, "max_solves": 20}
    res = run_grid(["gmm:toy2d"], ["euler"], [3, 4], ["karras"], ["ve"], ["none", "cal:trajectory"], [0, 1], 100,
                   progress=False, ref_steps=50, calibration=opts, calibration_dir=str(tmp_path))
    cal = [r for r in res["rows"] if r["stabilizer"] == "cal:trajectory"]
    assert len(cal) == 4 and all(r["status"] == "ok" and r["extra_passes"] == 0 for r in cal)
    by_nfe = {}
    for r in cal:
        by_nfe.setdefault(r["nfe_budget"], []).append(r)
    for rows in by_nfe.values():  # one calibration per cell, the same for both seeds
        assert rows[0]["calibrated_sigmas"] == rows[1]["calibrated_sigmas"]
        assert rows[0]["calibration"]["seed"] == 12345 and rows[0]["calibration"]["n"] == 64
        assert rows[0]["calibration"]["standalone_s"] >= rows[0]["calibration"]["wall_s"] > 0
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert res["config"]["calibration"]["gmm:toy2d"]["n"] == 64
    # a second grid reads the cached calibrations instead of fitting again
    monkeypatch.setattr(trajectory, "refine", lambda *a, **k: pytest.fail("fitted again"))
    again = run_grid(["gmm:toy2d"], ["euler"], [3, 4], ["karras"], ["ve"], ["cal:trajectory"], [0], 100,
                     progress=False, ref_steps=50, calibration=opts, calibration_dir=str(tmp_path))
    assert [r["calibrated_sigmas"] for r in again["rows"]] == [r["calibrated_sigmas"] for r in cal if r["seed"] == 0]
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                      reason="no CUDA device"))])
def test_run_cost_peak_memory(device):
    """Peak memory next to the time ratio: measured on CUDA (max_memory_allocated), null on the CPU."""
    entries = run_cost(["gmm:toy2d"], ["euler"], [3], stabilizers=["none", "stein"], probes_list=(2,), n=16, repeats=1,
                       progress=False, device=device, jacobian_batch=5)
    by = {e["stabilizer"]: e for e in entries}
    assert all(e["status"] == "ok" and e["device"].startswith(device) and e["jacobian_batch"] == 5 for e in entries)
    if device == "cpu":
        assert all(e["peak_mem_bytes"] is None and e["mem_ratio"] is None for e in entries)
    else:
        assert by["none"]["mem_ratio"] == 1.0 and by["stein"]["peak_mem_bytes"] > 0 and by["stein"]["mem_ratio"] > 0


def test_every_schedule_must_start_at_the_shared_noise_level(monkeypatch):
    """The grid draws each seed's noise once at sigma_max: a flow schedule that starts below it (DPM-Solver's flow
    grid, from t = 1 - 1/1000) is refused before any work; FlowMatchEuler's and UniPC's start at t_max."""
    import steindiff.bench.runner as R
    from steindiff.models import get_gmm
    from steindiff.models.registry import flow_mixture
    from steindiff.schedules import FlowSchedule

    R.validate_grid(["gmm:toy2d-flow", "gmm:toy2d-flow-unipc"], ["euler"], [3], ["karras", "logsnr", "flow", "time"],
                    ["ve"], ["none"], [0], 10)
    spec = flow_mixture(get_gmm("gmm:toy2d"))
    spec.process.schedule = FlowSchedule(grid="dpm")
    monkeypatch.setattr(R, "load_model", lambda name: spec)
    with pytest.raises(ValueError, match="starts at sigma 999, not at the process's sigma_max"):
        R.validate_grid(["dpm-flow"], ["euler"], [3], ["flow"], ["ve"], ["none"], [0], 10)


def test_merge_results_unites_shards_with_and_without_calibrated_cells():
    """Shards of one grid merge whatever their order: a shard with no calibrated cell has no calibration
    options; shards that calibrated one model differently are refused; the inputs are left as they were."""
    from steindiff.bench.runner import merge_results

    def shard(solver, cal=None):
        config = {"models": ["m"], "solvers": [solver], "n": 10}
        if cal is not None:
            config["calibration"] = {"m": cal}
        return {"schema": SCHEMA, "machine": {"wall_s_total": 1.0}, "config": config, "command": solver,
                "rows": [{"model": "m", "solver": solver, "schedule": "karras", "coords": "ve", "nfe_budget": 4,
                          "stabilizer": "none", "seed": 0}]}

    plain, cal = shard("euler"), shard("unipc", {"n": 256})
    merged = merge_results([plain, cal])
    assert merged["config"]["calibration"] == {"m": {"n": 256}} and merged["config"]["solvers"] == ["euler", "unipc"]
    assert "calibration" not in plain["config"] and len(merged["rows"]) == 2
    assert merge_results([cal, plain])["config"]["calibration"] == {"m": {"n": 256}}
    with pytest.raises(ValueError, match="calibrated m with different options"):
        merge_results([cal, shard("heun", {"n": 128})])


def test_the_gradient_fit_gets_the_studied_budget_in_adam_steps():
    """The gradient fit's budget is Adam steps (the study's), with a time cap, so that it does not depend on the
    machine's load: 150 steps of 32 pairs on image models, 300 of 64 on mixtures; the derivative-free fit's
    options are unchanged."""
    from steindiff.bench.runner import GRADIENT_BUDGET, calibration_options

    digits, mixture = load_model("digits"), load_model("gmm:toy2d")
    assert calibration_options(digits)["max_seconds"] == 40.0 and "gradient_options" not in calibration_options(digits)
    grad = calibration_options(digits, "gradient")
    assert grad["gradient_options"] == {"max_iters": 150, "batch_size": 32}
    assert GRADIENT_BUDGET["image"]["gradient_options"] == grad["gradient_options"]
    assert grad["max_seconds"] == 600.0 and grad["n"] == 256
    mix = calibration_options(mixture, "gradient")
    assert mix["gradient_options"] == {"max_iters": 300, "batch_size": 64} and mix["n"] == 512
    plain = calibration_options(mixture)
    assert plain["max_seconds"] == 45.0 and "gradient_options" not in plain


def test_worse_than_is_the_hurts_rule_with_worse_at_the_floor():
    """``worse_than(reference, other)``: hurts or failed against ``reference``, or past the hurt threshold where
    ``reference`` sits at its floor (a negative excess, e.g. recall above the held-out data's)."""
    from steindiff.bench.runner import worse_than

    ref = {"mean": 1.0, "std": 0.1}
    assert worse_than(ref, {"mean": 1.2, "std": 0.0}) and not worse_than(ref, {"mean": 1.1, "std": 0.0})
    assert worse_than(ref, None)  # failed
    floor = {"mean": -0.06, "std": 0.01}
    assert worse_than(floor, {"mean": -0.03, "std": 0.01}) and not worse_than(floor, {"mean": -0.055, "std": 0.0})
