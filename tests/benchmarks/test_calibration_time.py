"""benchmarks/calibration_time.py: one whole `steindiff calibrate` run, timed in its own process, recorded with
the calibration's own times and choice; a failing run stops with its error and writes nothing."""

import json
import os

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/time"), reason="needs GNU time at /usr/bin/time")


def test_one_calibration_is_timed_and_recorded(load_benchmark, tmp_path):
    timing = load_benchmark("calibration_time")
    out = tmp_path / "t.json"
    run = "--model gmm:toy2d --solver euler --nfe 3 --n 16 --ref-steps 10 --fit-method gradient --max-iters 2"
    assert timing.main(["--out", str(out), "--threads", "1", run]) == 0
    (rec,) = json.loads(out.read_text())["runs"]
    assert rec["start"] == "gits" and rec["params"] == ["steps", "model_sigmas"]
    assert rec["process_wall_s"] >= rec["calibration_wall_s"] > 0 and rec["max_rss_mb"] > 10
    assert "--max-iters 2" in rec["command"] and rec["chosen"] in ("plain", "gits", "gradient")
    bad = tmp_path / "bad.json"
    with pytest.raises(SystemExit, match="failed"):
        timing.main(["--out", str(bad), "--model gmm:nope --solver euler --nfe 3"])
    assert not bad.exists()
