"""benchmarks/mutation_check.py does not rot: every mutation still applies to the current source
(its target text occurs exactly once, on one line, the mutated file compiles, its tests exist), and the
check itself reports a mutation that no longer applies.  Its mechanics: the groups, how a pytest run is
read, and which test files ``--suite-traced`` runs for a mutated statement."""

import dataclasses
import json

import pytest


@pytest.fixture(scope="module")
def mc(load_benchmark):
    return load_benchmark("mutation_check")


def test_every_mutation_applies_cleanly(mc):
    assert mc.check_mutations() == []
    assert len(mc.MUTATIONS) >= 30
    # the two bugs that survived the whole suite before issue 14 stay on the list
    ids = {m.id for m in mc.MUTATIONS}
    assert {"sw2-sqrt", "energy-sigma2"} <= ids


def test_a_stale_mutation_is_reported(mc):
    m = mc.MUTATIONS[0]
    stale = dataclasses.replace(m, id="stale", find=m.find + "  # gone")
    twice = dataclasses.replace(m, id="twice", path="steindiff/metrics/mixture.py", find="return float(")
    problems = mc.check_mutations(mutations=[stale, twice, m, m])
    assert len(problems) == 3, problems
    assert f"duplicate id {m.id!r}" in problems[0]
    assert "stale: target text found 0 times" in problems[1]
    assert "twice: target text found" in problems[2] and "found 1 times" not in problems[2]


def test_cli_help_and_check(mc, capsys):
    with pytest.raises(SystemExit) as e:
        mc.main(["--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out
    assert mc.main(["--check"]) == 0
    assert "apply cleanly" in capsys.readouterr().out


def test_groups_select_the_core_list_the_audit_or_all(mc, tmp_path):
    core, audit, every = (mc.select(mc.MUTATIONS, groups=g) for g in ("core", "audit", "all"))
    assert {m.group for m in core} == {"core"} and "core" not in {m.group for m in audit}
    assert len(core) + len(audit) == len(every) == len(mc.MUTATIONS)
    # the audit: at least 60 mutations, spread over the areas it was asked to cover
    assert len(audit) >= 60
    assert {"choice", "cache", "image-metrics", "checkpoint", "distributed"} <= set(mc.AUDIT_GROUPS)
    two = mc.select(mc.MUTATIONS, groups="cache,checkpoint")
    assert two and {m.group for m in two} == {"cache", "checkpoint"}
    with pytest.raises(ValueError, match="unknown group"):
        mc.select(mc.MUTATIONS, groups="nope")
    with pytest.raises(ValueError, match="unknown mutation"):
        mc.select(mc.MUTATIONS, only="nope")
    ids = [m.id for m in audit[:3]]
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"mutations": [{"id": ids[0], "outcome": "caught"},
                                                 {"id": ids[1], "outcome": "survived"},
                                                 {"id": ids[2], "outcome": "error"}]}))
    assert [m.id for m in mc.select(mc.MUTATIONS, survivors_of=str(results))] == ids[1:]


def test_a_mutation_spanning_two_lines_is_refused(mc):
    m = mc.MUTATIONS[0]
    two = dataclasses.replace(m, id="two", path="steindiff/metrics/mixture.py",
                              find="x = _flat(x)\n    y = _flat(y).to(x.device)", replace="x = _flat(x)\n    y = x")
    assert mc.check_mutations(mutations=[two]) == ["two: not a one-line mutation"]


def test_deselected_tests_are_left_out_of_every_run(mc, monkeypatch):
    monkeypatch.setattr(mc, "DESELECTED", ["tests/a.py::test_x"])
    args = mc._pytest_args(["tests/b.py"])
    assert args[-3:] == ["--deselect", "tests/a.py::test_x", "tests/b.py"] and "-x" in args


def test_outcome_of_a_pytest_run(mc):
    assert mc.outcome_of(0, "3 passed")["outcome"] == "survived"
    failed = mc.outcome_of(1, "FAILED tests/a.py::test_x - assert 1 == 2\n1 failed, 2 passed")
    assert failed["outcome"] == "caught" and failed["caught_by"] == "tests/a.py::test_x" and failed["passed"] == 2
    # a fixture that calls the mutated code errors in the test's setup: caught
    assert mc.outcome_of(1, "ERROR tests/a.py::test_y - ValueError\n1 error")["outcome"] == "caught"
    # a collection error (exit status 2): the suite did not run
    assert mc.outcome_of(2, "ERROR tests/a.py - ImportError\n1 error")["outcome"] == "error"
    assert mc.outcome_of(None, "")["outcome"] == "timeout"


def test_traced_selection_runs_the_files_that_ran_the_statement(mc, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "X = 1\n"
        "def f(a, b=2):\n"
        "    y = (a +\n"
        "         b)\n"
        "    if y > 3 and \\\n"
        "            a > 0:\n"
        "        y = 0\n"
        "    return y\n")
    M = mc.Mutation

    def m(find):
        return M("m", "pkg/m.py", find, find + " ", ("tests",))

    assert mc.watched_lines(tmp_path, m("b=2")) == ([2], True)  # a default value: evaluated at import
    assert mc.watched_lines(tmp_path, m("X = 1")) == ([1], True)  # module level
    assert mc.watched_lines(tmp_path, m("b)")) == ([3, 4], False)  # every line of a simple statement
    assert mc.watched_lines(tmp_path, m("a > 0")) == ([5, 6], False)  # the header of a compound one, not its body
    assert mc.watched_lines(tmp_path, m("y = 0")) == ([7], False)
    f = str(tmp_path / "pkg" / "m.py")
    trace = {"hits": {f"{f}:4": ["tests/test_a.py"], f"{f}:7": ["tests/test_b.py", "tests/test_mutation_check.py"]},
             "spawners": ["tests/test_cli.py"]}
    assert mc.traced_selection(tmp_path, trace, m("b)")) == ("tests/test_a.py", "tests/test_cli.py")
    assert mc.traced_selection(tmp_path, trace, m("y = 0")) == ("tests/test_b.py", "tests/test_cli.py")
    assert mc.traced_selection(tmp_path, trace, m("b=2")) == mc.SUITE
    assert mc.traced_selection(tmp_path, {"hits": {}, "spawners": []}, m("y = 0")) == ()
    # run outside any test file (e.g. by a conftest at collection): the whole suite
    assert mc.traced_selection(tmp_path, {"hits": {f"{f}:7": ["tests"]}, "spawners": []}, m("y = 0")) == mc.SUITE
