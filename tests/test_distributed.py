"""Multi-process sampling: 2 CPU ranks (gloo) equal one process on the same global batch; a killed rank
fails the others with a clear message, finished shards are kept, the manifest and merge name the missing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from steindiff.distributed import (
    MissingShardsError,
    merge_shards,
    sample_distributed,
    shard_name,
    shard_range,
    shard_status,
)
from steindiff.generate import generate
from steindiff.models.registry import load_model
from steindiff.stabilizers import make_stabilizer

CFG = dict(n=12, solver="dpmpp_2m", nfe=5, seed=3)
STAB = {"probes": 2, "seed": 0}
# Two ranks sum their statistics in another order than one process: measured differences (float64,
# CPU) are 4e-14 relative on the gammas and 8e-13 absolute on samples of magnitude up to ~180
# (the Stein trajectory here is far from tame).  The tolerances keep a margin of 100x or more.
GAMMA_TOL = dict(rtol=1e-11, atol=0)
SAMPLE_TOL = dict(rtol=1e-10, atol=1e-10)

WORKER = textwrap.dedent("""
    import datetime, json, os, signal, sys
    import torch
    from steindiff.distributed import sample_distributed
    out, cfg, opts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])

    def kill_rank1(info):
        if info["rank"] == 1 and info["step"] == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    try:  # one process group for all runs (sample_distributed uses an existing group)
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
        for mode in ("global", "per-sample"):
            sample_distributed("gmm:image64", os.path.join(out, mode), stabilizer_name="stein", stabilizer_options=opts,
                               probe_mode=mode, dtype=torch.float64, **cfg)
        sample_distributed("gmm:image64", os.path.join(out, "killed"), dtype=torch.float64, callback=kill_rank1, **cfg)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two gloo ranks (plain subprocesses with torchrun's environment): Stein runs with global and
    per-sample probes, then a plain run in which rank 1 is killed (SIGKILL) after its second step."""
    d = tmp_path_factory.mktemp("dist")
    script = d / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(d), json.dumps(CFG), json.dumps(STAB)],
                                      env=env, stderr=subprocess.PIPE, text=True))
    return d, [(p.wait(timeout=120), p.stderr.read()) for p in procs]


def test_two_ranks_equal_single_process(two_ranks, tmp_path):
    d, results = two_ranks
    spec = load_model("gmm:image64")
    single = generate(spec, **CFG, stabilizer=make_stabilizer("stein", spec, **STAB), dtype=torch.float64)
    g_single = np.array([r["gamma"] for r in single.trace])
    assert np.ptp(g_single) > 1, results  # the trajectory is not trivial

    # global probes: the same as one process (the `steindiff sample` stream) on the global batch
    info = merge_shards(d / "global", tmp_path / "g.npz")
    assert info["n"] == 12 and info["world_size"] == 2
    with np.load(tmp_path / "g.npz") as z:
        np.testing.assert_allclose(z["gammas"], g_single, **GAMMA_TOL)
        np.testing.assert_allclose(z["samples"], single.x.numpy(), **SAMPLE_TOL)
    for r in range(2):  # each shard holds its slice of the global order, and the full trajectory
        with np.load(d / "global" / shard_name(r)) as z:
            lo, hi = shard_range(12, 2, r)
            assert z["indices"].tolist() == list(range(lo, hi))
            np.testing.assert_allclose(z["gammas"], g_single, **GAMMA_TOL)
    m = json.loads((d / "global" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["world_size"] == 2
    assert [s["file"] for s in m["shards"]] == [shard_name(0), shard_name(1)]

    # per-sample probes: independent of the world size (world size 1, in this process)
    one = sample_distributed("gmm:image64", tmp_path / "one", stabilizer_name="stein", stabilizer_options=STAB,
                             probe_mode="per-sample", dtype=torch.float64, **CFG)
    assert one.world_size == 1
    merge_shards(tmp_path / "one", tmp_path / "one.npz")
    merge_shards(d / "per-sample", tmp_path / "p.npz")
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "p.npz") as b:
        np.testing.assert_allclose(b["gammas"], a["gammas"], **GAMMA_TOL)
        np.testing.assert_allclose(b["samples"], a["samples"], **SAMPLE_TOL)
        assert not np.allclose(a["gammas"], g_single)  # another probe stream than the global one


def test_killed_rank_fails_clearly_and_keeps_finished_shards(two_ranks, tmp_path):
    d, [(rc0, err0), (rc1, _)] = two_ranks
    assert rc1 == -9 and rc0 == 1, err0
    assert "DistributedSamplingError: rank 0 of 2" in err0 and "another rank probably died" in err0
    assert "Missing shards" in err0 and shard_name(1) in err0
    k = d / "killed"
    assert (k / shard_name(0)).exists() and not (k / shard_name(1)).exists()
    m = json.loads((k / "manifest.json").read_text())
    assert m["status"] == "failed" and m["missing"] == [shard_name(1)] and "error" in m
    st = shard_status(k)
    assert st["present"] == [shard_name(0)] and st["missing"] == [shard_name(1)]
    with pytest.raises(MissingShardsError, match=f"1 of 2 shards unusable: missing {shard_name(1)}"):
        merge_shards(k, tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()


def test_single_process_and_stale_shards(tmp_path):
    kw = dict(n=6, solver="euler", nfe=3, seed=1)
    r = sample_distributed("gmm:toy2d", tmp_path / "a", **kw)
    assert (r.rank, r.world_size, r.start, r.stop) == (0, 1, 0, 6)
    merge_shards(tmp_path / "a", tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz") as z:
        spec = load_model("gmm:toy2d")
        assert np.array_equal(z["samples"], generate(spec, **kw).x.numpy())
        assert json.loads(str(z["config"]))["world_size"] == 1
    # a shard of another run (other seed) under the same name is stale: refused, named
    sample_distributed("gmm:toy2d", tmp_path / "b", **{**kw, "seed": 2})
    os.replace(tmp_path / "b" / shard_name(0), tmp_path / "a" / shard_name(0))
    with pytest.raises(MissingShardsError, match=f"stale \\(from another run\\) {shard_name(0)}"):
        merge_shards(tmp_path / "a", tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        merge_shards(tmp_path, tmp_path / "x.npz")
    with pytest.raises(ValueError, match="probe_mode"):
        sample_distributed("gmm:toy2d", tmp_path / "c", probe_mode="random", **kw)
    assert [shard_range(10, 3, r) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_rank_device(monkeypatch):
    from steindiff.device import DeviceError
    from steindiff.distributed import rank_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert rank_device(None) == torch.device("cuda", 1 % n)
        if n < 2:
            with pytest.raises(DeviceError, match="local rank 1 has no GPU"):
                rank_device("cuda")
    else:
        assert rank_device(None) == rank_device("auto") == torch.device("cpu")
        with pytest.raises(DeviceError, match="CUDA is not available"):
            rank_device("cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                      reason="no CUDA device"))])
def test_single_process_on_a_device(tmp_path, device):
    kw = dict(n=8, solver="dpmpp_2m", nfe=3, seed=1)
    r = sample_distributed("gmm:toy2d", tmp_path / "a", stabilizer_name="stein", stabilizer_options={"probes": 2},
                           dtype=torch.float64, device=device, **kw)
    assert r.device.startswith(device)
    spec = load_model("gmm:toy2d")
    ref = generate(spec, stabilizer=make_stabilizer("stein", spec, probes=2), dtype=torch.float64, **kw)
    with np.load(tmp_path / "a" / shard_name(0)) as z:
        np.testing.assert_allclose(z["samples"], ref.x.numpy(), rtol=1e-9, atol=1e-12)
