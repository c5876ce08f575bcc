"""``steindiff sample-dist`` and ``steindiff merge``: help, single process, torchrun with 2 ranks, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from steindiff.cli import main

RUN = ["--model", "gmm:toy2d", "--solver", "dpmpp_2m", "--nfe", "4", "--stabilizer", "stein", "--probes", "2",
       "--dtype", "float64", "--seed", "5", "--no-progress"]


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("cmd", ["sample-dist", "merge"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and cmd in capsys.readouterr().out


def reference(tmp_path, capsys):
    """`steindiff sample` on the same configuration: samples and gammas."""
    assert main(["sample", *RUN, "--n", "16", "--out", str(tmp_path / "ref.npz"), "--json"]) == 0
    json.loads(capsys.readouterr().out)
    with np.load(tmp_path / "ref.npz") as z:
        return z["samples"], z["gammas"]


def test_single_process_then_merge_equals_sample(tmp_path, capsys):
    ref_x, ref_g = reference(tmp_path, capsys)
    assert main(["sample-dist", *RUN, "--num-samples", "16", "--out-dir", str(tmp_path / "run"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["world_size"] == 1 and s["shards"] == ["shard-00000.npz"] and s["nfe"] == 4
    np.testing.assert_allclose(s["gammas"], ref_g, rtol=1e-12)
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "m.npz"), "--json", "--metrics"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 16 and "sw2" in m["metrics"]
    with np.load(tmp_path / "m.npz") as z:
        np.testing.assert_allclose(z["samples"], ref_x, rtol=1e-12)
    # text mode
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "m2.npz")]) == 0
    assert "merged 1 shard(s), 16 samples" in capsys.readouterr().out


def test_two_ranks_equal_sample(tmp_path, capfd, monkeypatch):
    """--nproc-per-node 2 starts the ranks as torchrun does (gloo); the merged shards equal `steindiff sample`."""
    ref_x, ref_g = reference(tmp_path, capfd)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["sample-dist", *RUN, "--num-samples", "16", "--backend", "gloo", "--timeout", "60",
                 "--out-dir", str(tmp_path / "run"), "--json", "--nproc-per-node", "2"]) == 0
    s = json.loads(capfd.readouterr().out)  # rank 0 alone prints the summary
    assert s["world_size"] == 2 and s["shards"] == ["shard-00000.npz", "shard-00001.npz"]
    np.testing.assert_allclose(s["gammas"], ref_g, rtol=1e-6)
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "m.npz"), "--json"]) == 0
    assert json.loads(capfd.readouterr().out)["world_size"] == 2
    with np.load(tmp_path / "m.npz") as z:
        np.testing.assert_allclose(z["samples"], ref_x, rtol=1e-6, atol=1e-9)


def test_launcher_refuses_once_with_exit_2_before_starting(tmp_path, capfd, monkeypatch):
    """--nproc-per-node checks the arguments once, for that many ranks, and starts nothing on a refusal."""
    import torch.distributed.run as torchrun

    monkeypatch.setattr(torchrun, "run", lambda a: pytest.fail("started the ranks"))
    out = ["--out-dir", str(tmp_path / "r"), "--nproc-per-node", "2"]
    assert main(["sample-dist", *RUN, "--solver", "nope", *out]) == 2
    err = capfd.readouterr().err
    assert err.count("unknown solver 'nope'") == 1 and "Traceback" not in err
    assert main(["sample-dist", *RUN, "--num-samples", "3", *out]) == 2  # 3 samples over 2 ranks: one has 1
    assert "at least 2 samples per rank; --num-samples 3 over 2 ranks" in capfd.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sample-dist", *RUN, *out]) == 2
    assert "do not combine it with torchrun" in capfd.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("code,exit_code", [(2, 2), (1, 1)])
def test_launcher_reports_a_failed_rank_in_one_line(tmp_path, capfd, monkeypatch, code, exit_code):
    """A rank's refusal (exit 2, printed by rank 0) keeps exit 2 and adds nothing; a runtime failure is one line
    naming the rank, not torchrun's traceback."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failed(a):
        raise ChildFailedError("steindiff", {1: ProcessFailure(local_rank=1, pid=1, exitcode=code, error_file="")})

    monkeypatch.setattr(torchrun, "run", failed)
    assert main(["sample-dist", *RUN, "--out-dir", str(tmp_path / "r"), "--nproc-per-node", "2"]) == exit_code
    err = capfd.readouterr().err.strip()
    if code == 2:
        assert err == ""
    else:
        assert err.splitlines() == [f"steindiff sample-dist: error: RuntimeError: 1 of 2 processes failed (rank 1: "
                                    f"exit code 1; its error is above); finished shards are kept in {tmp_path / 'r'}"]


def test_under_torchrun_only_rank_0_prints_a_refusal(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "steindiff",
           "sample-dist", *RUN, "--solver", "nope", "--out-dir", str(tmp_path / "run")]
    p = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert p.returncode != 0  # torchrun's own exit status for a failed rank
    assert p.stderr.count("steindiff sample-dist: error: unknown solver 'nope'") == 1, p.stderr[-2000:]


def test_refusals(tmp_path, capsys):
    assert main(["sample-dist", *RUN, "--solver", "nope", "--out-dir", str(tmp_path / "a")]) == 2
    assert "unknown solver 'nope'" in capsys.readouterr().err
    assert main(["sample-dist", *RUN, "--num-samples", "1", "--out-dir", str(tmp_path / "a")]) == 2
    assert "at least 2 samples per rank" in capsys.readouterr().err
    assert main(["sample-dist", *RUN, "--out-dir", str(tmp_path / "no" / "such" / "dir")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["merge", str(tmp_path / "missing"), "--out", str(tmp_path / "m.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a run whose shard is gone: merge names it, exit 2, writes nothing
    assert main(["sample-dist", *RUN, "--num-samples", "4", "--out-dir", str(tmp_path / "r"), "--json"]) == 0
    capsys.readouterr()
    os.unlink(tmp_path / "r" / "shard-00000.npz")
    assert main(["merge", str(tmp_path / "r"), "--out", str(tmp_path / "m.npz")]) == 2
    err = capsys.readouterr().err
    assert "steindiff merge: error:" in err and "missing shard-00000.npz" in err
    assert not (tmp_path / "m.npz").exists()
    with pytest.raises(SystemExit) as e:
        main(["merge", str(tmp_path / "r")])  # --out is required
    assert e.value.code == 2


AUTO = ["--model", "gmm:toy2d", "--solver", "euler", "--nfe", "3", "--stabilizer", "auto", "--dtype", "float64",
        "--seed", "2", "--no-progress"]


def test_auto_is_the_calibrated_sampler_as_in_sample(tmp_path, capsys, monkeypatch):
    """sample-dist --stabilizer auto applies the calibration `sample --stabilizer auto` fits and caches (same
    samples); under torchrun a missing calibration is refused before any work, since every rank would fit it."""
    from steindiff.stabilizers import registry

    monkeypatch.setattr(registry, "AUTO", registry.CALIBRATED)
    cache = ["--calibration-dir", str(tmp_path / "cal")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sample-dist", *AUTO, *cache, "--num-samples", "32", "--out-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "no calibration of gmm:toy2d euler / karras / NFE 3" in err and "--calibrate never" in err
    assert "steindiff calibrate --model gmm:toy2d --solver euler --schedule karras --nfe 3 --calibration-dir" in err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "cal").exists()
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["sample", *AUTO, *cache, "--n", "32", "--out", str(tmp_path / "s.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stabilizer"] == "auto (calibrated)"
    assert main(["sample-dist", *AUTO, *cache, "--num-samples", "32", "--out-dir", str(tmp_path / "r"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["stabilizer"] == "auto (calibrated)" and s["extra_passes"] == 0
    assert main(["merge", str(tmp_path / "r"), "--out", str(tmp_path / "m.npz"), "--json"]) == 0
    capsys.readouterr()
    with np.load(tmp_path / "m.npz") as m, np.load(tmp_path / "s.npz") as z:
        np.testing.assert_array_equal(m["samples"], z["samples"])
        np.testing.assert_array_equal(m["gammas"], z["gammas"])
        assert not np.all(z["gammas"] == 1.0)  # a fitted calibration, not the plain solver
