"""Multi-process sampling: 2 CPU ranks (gloo) equal one process on the same global batch; a killed rank
fails the others with a clear message, finished shards are kept, the manifest and merge name the missing."""

from __future__ import annotations

import json
import math
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
# More runs of the two ranks, each against one process on the global batch: (stabilizer, options beyond STAB).
# stein-energy's gamma depends on the batch means' normaliser (its target energy is not scale free), per_sample
# records the mean of the per-sample gammas, energy_from="first" with per_sample uses the batch's data energy.
TRACED = {
    "energy": ("stein-energy", {}),
    "energy-each": ("stein-energy", {"energy_from": "each"}),
    "lookahead": ("stein-sc", {}),
    "per-sample-gamma": ("stein", {"per_sample": True}),
    "energy-per-sample": ("stein-energy", {"per_sample": True}),
}

WORKER = textwrap.dedent("""
    import datetime, json, os, signal, sys
    import torch
    import steindiff.distributed as D
    from steindiff.distributed import sample_distributed
    out, cfg, opts, traced = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
    runs = []  # every generation sample_distributed makes on this rank: its trace records are kept
    _generate = D.generate

    def capture(*a, **k):
        runs.append(_generate(*a, **k))
        return runs[-1]

    D.generate = capture

    def kill_rank1(info):
        if info["rank"] == 1 and info["step"] == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    try:  # one process group for all runs (sample_distributed uses an existing group)
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
        for mode in ("global", "per-sample"):
            sample_distributed("gmm:image64", os.path.join(out, mode), stabilizer_name="stein", stabilizer_options=opts,
                               probe_mode=mode, dtype=torch.float64, **cfg)
        for name, (stab, extra) in traced.items():
            sample_distributed("gmm:image64", os.path.join(out, name), stabilizer_name=stab,
                               stabilizer_options={**opts, **extra}, dtype=torch.float64, **cfg)
        names = ["global", "per-sample", *traced]
        torch.save({k: {"trace": g.trace, "x": g.x} for k, g in zip(names, runs)},
                   os.path.join(out, "runs-%s.pt" % os.environ["RANK"]))
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
        procs.append(subprocess.Popen([sys.executable, str(script), str(d), json.dumps(CFG), json.dumps(STAB),
                                       json.dumps(TRACED)], env=env, stderr=subprocess.PIPE, text=True))
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


def _close(a, b, rtol=1e-9, atol=1e-12):
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    return a == b


@pytest.mark.parametrize("name", ["global", *TRACED])
def test_every_recorded_statistic_of_two_ranks_equals_one_process(two_ranks, tmp_path, name):
    """Each step's trace record on both ranks (the batch means s_*, gamma and gamma_raw, the pass counts) and
    the samples equal those of one process on the global batch, for each stabilizer with batch statistics:
    the means are sums over both ranks divided by the global batch size, the per-sample gammas' mean too,
    and every rank draws its slice of the global batch's probes at every step."""
    d, results = two_ranks
    assert all((d / f"runs-{r}.pt").is_file() for r in range(2)), results
    ranks = [torch.load(d / f"runs-{r}.pt", weights_only=False) for r in range(2)]
    stab, extra = TRACED.get(name, ("stein", {}))
    spec = load_model("gmm:image64")
    single = generate(spec, **CFG, stabilizer=make_stabilizer(stab, spec, **STAB, **extra), dtype=torch.float64)
    gammas = [rec["gamma"] for rec in single.trace]
    assert len(gammas) == 5 and max(abs(g - 1) for g in gammas) > 5e-3  # not the plain solver throughout
    torch.testing.assert_close(torch.cat([r[name]["x"] for r in ranks]), single.x, rtol=1e-10, atol=1e-10)
    for rank in ranks:
        assert len(rank[name]["trace"]) == len(single.trace)
        for i, (mine, ref) in enumerate(zip(rank[name]["trace"], single.trace)):
            assert set(mine) == set(ref)
            bad = {k: (mine[k], ref[k]) for k in ref if k != "wall_s" and not _close(mine[k], ref[k])}
            assert not bad, f"step {i}: {bad}"
    # each rank's shard records the run's gamma trajectory: the shards merge
    info = merge_shards(d / name, tmp_path / "m.npz")
    assert info["n"] == CFG["n"]
    with np.load(tmp_path / "m.npz") as z:
        np.testing.assert_allclose(z["gammas"], gammas, **GAMMA_TOL)


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


def test_global_probes_are_each_ranks_slice_of_the_global_draw_and_change_every_step():
    """probe_mode "global": rank r's probes at a step are columns [start, stop) of the probes one process
    draws for the whole batch from the stabilizer's generator (the same seed on every rank), and the
    generator moves on, so the next step has other probes."""
    from steindiff.distributed import _global_probes
    from steindiff.stabilizers.divergence import draw_probes

    n, p, shape = 7, 3, (2, 3)
    full_gen = torch.Generator().manual_seed(11)
    full = [draw_probes((n, *shape), p, "gaussian", full_gen, torch.float64) for _ in range(2)]
    assert not torch.allclose(full[0], full[1])
    for r in range(3):
        lo, hi = shard_range(n, 3, r)
        fn, gen = _global_probes(n, lo, hi), torch.Generator().manual_seed(11)
        x = torch.zeros(hi - lo, *shape, dtype=torch.float64)
        for step in range(2):
            v = fn(x, p, gen)
            assert v.shape == (p, hi - lo, *shape) and v.dtype == torch.float64
            torch.testing.assert_close(v, full[step][:, lo:hi], rtol=0, atol=0)
        with pytest.raises(ValueError, match=f"shard of {hi - lo} samples, got a batch of {hi - lo + 1}"):
            fn(torch.zeros(hi - lo + 1, *shape), p, gen)


def test_per_sample_probes_depend_on_seed_step_and_global_index_only():
    """probe_mode "per-sample": sample j's probes at step c come from (seed, c, j) alone: the same in any
    shard that holds j (any world size), other ones at the next step, for another sample or another seed."""
    from steindiff.distributed import _per_sample_probes

    n, p, shape = 6, 2, (4,)
    gen = torch.Generator().manual_seed(0)  # not used: the per-sample generators are seeded anew

    def draws(seed, lo, hi, steps=3):
        fn = _per_sample_probes(seed, lo, hi)
        return [fn(torch.zeros(hi - lo, *shape), p, gen) for _ in range(steps)]

    whole = draws(5, 0, n)
    assert all(v.shape == (p, n, *shape) for v in whole)
    for world in (2, 3):
        for r in range(world):
            lo, hi = shard_range(n, world, r)
            for step, v in enumerate(draws(5, lo, hi)):
                torch.testing.assert_close(v, whole[step][:, lo:hi], rtol=0, atol=0)
    flat = torch.stack(whole).reshape(3, p, n, -1)
    for c in range(3):  # every (step, sample) pair has its own probes
        for j in range(n):
            others = [flat[c2, :, j2] for c2 in range(3) for j2 in range(n) if (c2, j2) != (c, j)]
            assert all(not torch.allclose(flat[c, :, j], o) for o in others)
    assert not torch.allclose(draws(6, 0, n, 1)[0], whole[0])
    assert abs(float(torch.stack(whole).std()) - 1) < 0.2  # standard Gaussian probes


def test_batch_statistics_need_two_samples_per_rank(tmp_path):
    with pytest.raises(ValueError, match="at least 2 samples per rank; n=1 over 1 ranks leaves 1"):
        sample_distributed("gmm:toy2d", tmp_path / "a", n=1, solver="euler", nfe=3, stabilizer_name="stein")
    r = sample_distributed("gmm:toy2d", tmp_path / "b", n=1, solver="euler", nfe=3, stabilizer_name="stein",
                           stabilizer_options={"per_sample": True, "probes": 2})
    assert (r.start, r.stop) == (0, 1) and len(r.gammas) == 3


def test_a_run_draws_new_global_probes_at_every_step_from_the_stabilizers_seed(tmp_path, monkeypatch):
    """What sample_distributed hands the stabilizer: at step c, the c-th draw of the global batch's probes from
    a generator seeded with the stabilizer's seed (so every rank draws the same ones)."""
    import steindiff.distributed as D
    from steindiff.stabilizers.divergence import draw_probes

    drawn = []

    def recording(n, start, stop):
        fn = _global_probes(n, start, stop)
        return lambda x, p, gen: drawn.append(fn(x, p, gen)) or drawn[-1]

    from steindiff.distributed import _global_probes

    monkeypatch.setattr(D, "_global_probes", recording)
    sample_distributed("gmm:toy2d", tmp_path / "a", n=5, solver="euler", nfe=3, stabilizer_name="stein",
                       stabilizer_options={"probes": 2, "seed": 7}, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    assert len(drawn) == 3
    for v in drawn:
        torch.testing.assert_close(v, draw_probes((5, 2), 2, "gaussian", gen, torch.float64), rtol=0, atol=0)
    assert not torch.allclose(drawn[0], drawn[1])


def test_a_shard_records_the_trajectory_of_gamma_and_of_gamma_before_the_clip(tmp_path):
    """Each shard keeps, per step, the gamma applied and the raw coefficient before the clip (they differ where the
    clip acted), its samples' global indices and the plan's noise levels, as one process records them."""
    kw = dict(n=6, solver="euler", nfe=4, seed=1)
    opts = {"probes": 2, "seed": 0, "gamma_max": 1.0, "gamma_min": 0.95}
    sample_distributed("gmm:toy2d", tmp_path / "a", stabilizer_name="stein", stabilizer_options=opts,
                       dtype=torch.float64, **kw)
    spec = load_model("gmm:toy2d")
    one = generate(spec, **kw, stabilizer=make_stabilizer("stein", spec, **opts), dtype=torch.float64)
    with np.load(tmp_path / "a" / shard_name(0)) as z:
        raw, gam = [r.get("gamma_raw", r["gamma"]) for r in one.trace], [r["gamma"] for r in one.trace]
        np.testing.assert_allclose(z["gamma_raw"], raw, rtol=1e-12)
        np.testing.assert_allclose(z["gammas"], gam, rtol=1e-12)
        assert not np.allclose(z["gammas"], z["gamma_raw"])  # the clip acted somewhere
        assert z["indices"].tolist() == list(range(6)) and np.allclose(z["sigmas"], one.sigmas)
        np.testing.assert_allclose(z["samples"], one.x.numpy(), rtol=1e-12, atol=1e-12)
