"""Multi-process sampling on ``torch.distributed`` (gloo on CPU, nccl on GPU), started with torchrun.

The global batch of ``n`` samples is defined by the seed alone: the initial noise of all ``n``
samples is drawn at once (as :func:`steindiff.generate.generate` draws it) and rank ``r`` takes the
contiguous slice :func:`shard_range`.  A batch-statistics stabilizer (Stein, ...) gets a ``reduce``
that all-reduces (sums) its per-step statistics, so every rank uses the same ``gamma``, and its
Hutchinson probes are made independent of the sharding (``probe_mode``):

- ``"global"`` (default): every rank draws the probes of the whole global batch from the
  stabilizer's generator and keeps its slice.  Results equal a single process on the global batch
  (``steindiff sample``), at a memory cost of ``probes * n * dim`` per rank and step.
- ``"per-sample"``: each sample's probes come from its own generator, seeded by
  ``(seed, step, global index)``.  Memory ``probes * shard * dim``; results do not depend on the
  world size but differ from ``steindiff sample``'s probe stream.

Output directory: ``manifest.json`` (written by rank 0 before sampling and updated at the end:
expected shards, config, world size, status) and one ``shard-{rank:05d}.npz`` per rank, each written
atomically.  :func:`merge_shards` merges them in global order and refuses, naming them, if shards are
missing or stale.  If a rank dies, the collectives of the others fail (at the latest after the
process group's timeout) and they raise :class:`DistributedSamplingError`; finished shards stay.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .generate import generate
from .io import save_json, save_npz, to_jsonable
from .models.registry import ModelSpec, load_model
from .plan import SamplingPlan, make_plan
from .sampling import prior_noise
from .stabilizers import make_stabilizer
from .stabilizers.divergence import draw_probes, to_device

__all__ = ["sample_distributed", "rank_device", "merge_shards", "shard_status", "shard_range", "shard_name",
           "DistResult", "DistributedSamplingError", "MissingShardsError", "MANIFEST", "PROBE_MODES"]

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "steindiff.dist-manifest/1"
PROBE_MODES = ("global", "per-sample")


class DistributedSamplingError(RuntimeError):
    """A collective failed or timed out: another rank died or stalled."""


class MissingShardsError(ValueError):
    """:func:`merge_shards` found missing or stale shards."""


def shard_range(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Global indices ``[start, stop)`` of rank ``rank``'s shard: contiguous, sizes differing by at most 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return rank * n // world_size, (rank + 1) * n // world_size


def shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.npz"


@dataclass
class DistResult:
    """What one rank did: its shard, and the run's ``gamma`` trajectory (the same on every rank)."""

    rank: int
    world_size: int
    out_dir: str
    shard: str
    start: int
    stop: int
    nfe: int
    extra_passes: int
    gammas: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    config: dict = field(default_factory=dict)
    run_id: str = ""
    device: str = "cpu"


# -- process group --------------------------------------------------------------------------------

def _init_group(backend: str, timeout_s: float) -> tuple[int, int, bool]:
    """``(rank, world_size, initialized_here)``; world size 1 without a process group when not launched
    by torchrun (no ``WORLD_SIZE`` in the environment) and no group exists."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1 and "MASTER_ADDR" not in os.environ:
        return 0, 1, False
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # a timed-out collective raises instead of aborting
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, TimeoutError, ValueError) as e:
        raise DistributedSamplingError(
            f"rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']}: could not join the process group "
            f"({backend}, timeout {timeout_s:g} s); did every rank start? {type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:300]}") from e
    return dist.get_rank(), dist.get_world_size(), True


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"  # its collectives run on the rank's GPU, gloo's on the CPU
    buf = t.detach().to(torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def rank_device(device: str | torch.device | None = None) -> torch.device:
    """This rank's device.  ``None``/``auto``: under nccl the rank's GPU (``cuda:LOCAL_RANK``, set by
    the process group), else CUDA when available (``cuda:LOCAL_RANK`` modulo the devices present),
    else the CPU.  ``cuda``: ``cuda:LOCAL_RANK``.  ``cpu``, ``cuda:N``: as given."""
    import torch.distributed as dist

    from .device import DeviceError, resolve_device

    name = "auto" if device is None else device
    if isinstance(name, str) and name.strip().lower() in ("auto", "cuda"):
        nccl = dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"
        if nccl:
            return torch.device("cuda", torch.cuda.current_device())
        dev = resolve_device(name)  # raises for cuda without CUDA
        if dev.type == "cuda":
            local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
            if name.strip().lower() == "cuda" and local >= count:
                raise DeviceError(f"--device cuda: local rank {local} has no GPU of its own ({count} visible); "
                                  "start at most one process per GPU or use --device auto")
            return torch.device("cuda", local % count)
        return dev
    return resolve_device(name)


# -- probes ---------------------------------------------------------------------------------------

def _check_shard(x: torch.Tensor, start: int, stop: int) -> None:
    if x.shape[0] != stop - start:
        raise ValueError(f"probe source expected this rank's shard of {stop - start} samples, got a batch of "
                         f"{x.shape[0]}")


def _global_probes(n: int, start: int, stop: int) -> Callable:
    def fn(x: torch.Tensor, p: int, generator: torch.Generator) -> torch.Tensor:
        _check_shard(x, start, stop)
        full = draw_probes((n, *x.shape[1:]), p, "gaussian", generator, x.dtype)  # on the CPU: only the slice moves
        return to_device(full[:, start:stop].contiguous(), x.device)

    return fn


def _per_sample_probes(seed: int, start: int, stop: int) -> Callable:
    calls = [0]

    def fn(x: torch.Tensor, p: int, generator: torch.Generator) -> torch.Tensor:
        _check_shard(x, start, stop)
        call, calls[0] = calls[0], calls[0] + 1
        rows = []
        for j in range(start, stop):
            s = int(np.random.SeedSequence([seed, call, j]).generate_state(1, np.uint64)[0] >> np.uint64(1))
            rows.append(draw_probes((1, *x.shape[1:]), p, "gaussian", torch.Generator().manual_seed(s), x.dtype))
        return to_device(torch.cat(rows, dim=1), x.device)

    return fn


# -- sampling -------------------------------------------------------------------------------------

def sample_distributed(model: Any, out_dir: str | os.PathLike, plan: SamplingPlan | None = None, *, n: int,
                       solver: str = "dpmpp_2m", nfe: int = 10, schedule: str = "karras", rho: float = 7.0,
                       seed: int = 0, stabilizer_name: str | None = None, stabilizer_options: dict | None = None,
                       probe_mode: str = "global", dtype: torch.dtype = torch.float32, backend: str = "auto",
                       timeout_s: float = 300.0, device: str | torch.device | None = None,
                       callback: Callable[[dict], None] | None = None, progress: bool = False) -> DistResult:
    """Sample this rank's shard of ``n`` samples and write it to ``out_dir`` (module docstring).

    ``model``: a model name (``gmm:image64``, ``digits``, a checkpoint) or a
    :class:`~steindiff.models.registry.ModelSpec`.  ``plan``: the solver and noise levels (default:
    :func:`~steindiff.plan.make_plan` of ``solver``, ``nfe``, ``schedule``, ``rho``).  The stabilizer is
    built here by name, ``stabilizer_name`` with ``stabilizer_options``
    (:func:`~steindiff.stabilizers.make_stabilizer`), with this rank's reduction and probe source.
    Initializes the process group from torchrun's environment (``backend`` ``auto``: nccl with CUDA, else gloo;
    ``timeout_s`` bounds every collective) unless one exists; without torchrun's environment it runs as world size 1.
    ``device``: see :func:`rank_device` (default: under nccl each rank on its own GPU, ``LOCAL_RANK``;
    the statistics are then all-reduced on the GPU).  The model is moved there.
    Raises :class:`DistributedSamplingError` when a collective fails (another rank died or stalled).
    """
    import torch.distributed as dist

    if probe_mode not in PROBE_MODES:
        raise ValueError(f"probe_mode must be one of {', '.join(PROBE_MODES)}, got {probe_mode!r}")
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    if not (timeout_s > 0):
        raise ValueError(f"timeout must be positive, got {timeout_s}")
    spec: ModelSpec = load_model(model) if isinstance(model, str) else model
    if plan is None:
        plan = make_plan(spec.process, solver, nfe, schedule, rho=rho)
    sigmas = plan.sigmas
    out = Path(out_dir)

    rank, world, owned = _init_group(backend, timeout_s)
    try:
        if n < world:
            raise ValueError(f"n={n} samples cannot be sharded over {world} ranks (at least one sample per rank)")
        start, stop = shard_range(n, world, rank)
        grouped = world > 1 or (dist.is_available() and dist.is_initialized())  # a group of one rank too: same path
        probes = _global_probes(n, start, stop) if probe_mode == "global" else _per_sample_probes(seed, start, stop)
        stabilizer = make_stabilizer(stabilizer_name or "none", spec, **(stabilizer_options or {}),
                                     reduce=_all_reduce_sum if grouped else None, probe_source=probes)
        if stabilizer is not None and not getattr(stabilizer, "per_sample", False) and n // world < 2:
            raise ValueError(f"the stabilizer's batch statistics need at least 2 samples per rank; n={n} over "
                             f"{world} ranks leaves {n // world}")
        device = rank_device(device)
        config = {
            "model": spec.name, "solver": plan.solver, "nfe": nfe, "schedule": plan.schedule, "rho": rho, "seed": seed,
            "n": n, "dtype": str(dtype).replace("torch.", ""), "world_size": world, "probe_mode": probe_mode,
            # a plan with gammas (a calibration) is what runs when no stabilizer is named
            "stabilizer": stabilizer_name if stabilizer_name not in (None, "none") else
            ("calibrated" if plan.gammas is not None else "none"), "stabilizer_options": stabilizer_options or {},
            "sigmas": [float(s) for s in sigmas], **({"gammas": plan.gammas} if plan.gammas is not None else {}),
            **{k: getattr(plan, k) for k in ("model_sigmas", "history") if getattr(plan, k) is not None},
        }
        run_id = hashlib.sha256(json.dumps(to_jsonable(config), sort_keys=True).encode()).hexdigest()[:16]
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"schema": MANIFEST_SCHEMA, "run_id": run_id, "world_size": world, "n": n, "config": config,
                    "shards": [{"rank": r, "file": shard_name(r), "start": shard_range(n, world, r)[0],
                                "stop": shard_range(n, world, r)[1]} for r in range(world)],
                    "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if rank == 0:
            save_json(out / MANIFEST, manifest)

        spec.to(device)  # in place: a stabilizer built on the spec (e.g. a mixture's exact divergence) follows

        noise = prior_noise((n, *spec.sample_shape), float(sigmas[0]), spec.process, seed=seed, dtype=dtype)
        noise = noise[start:stop].clone().to(device)
        step = [-1]

        def cb(info: dict) -> None:
            step[0] = info["step"]
            if callback is not None:
                callback({**info, "rank": rank, "world_size": world})

        try:
            gen = generate(spec, plan, n=stop - start, seed=seed, stabilizer=stabilizer, dtype=dtype,
                           progress=progress and rank == 0, noise=noise, callback=cb)
        except RuntimeError as e:
            if world > 1 and _is_comm_error(e):
                _fail(out, rank, world, manifest, f"a collective failed after step {step[0]}", e, timeout_s)
            raise
        gammas = [float(r.get("gamma", 1.0)) for r in gen.trace]
        gamma_raw = [float(r.get("gamma_raw", r.get("gamma", 1.0))) for r in gen.trace]
        save_npz(out / shard_name(rank), samples=gen.x, indices=np.arange(start, stop), sigmas=sigmas,
                 gammas=np.asarray(gammas, dtype=np.float64), gamma_raw=np.asarray(gamma_raw, dtype=np.float64),
                 run_id=np.array(run_id), rank=np.array(rank), world_size=np.array(world))
        if world > 1:
            try:
                dist.barrier()
            except RuntimeError as e:
                _fail(out, rank, world, manifest, "the final barrier failed (this rank's shard was written)", e,
                      timeout_s)
        if rank == 0:
            st = shard_status(out)
            status = "incomplete" if st["missing"] or st["stale"] else "complete"
            save_json(out / MANIFEST, {**manifest, "status": status, "missing": st["missing"], "stale": st["stale"],
                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return DistResult(rank, world, str(out), str(out / shard_name(rank)), start, stop, gen.nfe, gen.extra_passes,
                          gammas, gen.wall_s, config, run_id, str(device))
    finally:
        if owned:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _is_comm_error(e: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return any(k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket",
                                   "broken pipe"))


def _fail(out: Path, rank: int, world: int, manifest: dict, what: str, e: BaseException, timeout_s: float) -> None:
    missing = {"missing": [shard_name(r) for r in range(world)], "stale": []}
    st = shard_status(out) if (out / MANIFEST).exists() else missing
    if rank == 0:
        with contextlib.suppress(OSError):
            save_json(out / MANIFEST, {**manifest, "status": "failed", "missing": st["missing"], "stale": st["stale"],
                                       "error": f"rank 0: {what}: {type(e).__name__}: "
                                                f"{str(e).splitlines()[0] if str(e) else ''}"})
    msg = (f"rank {rank} of {world}: {what}; another rank probably died or stalled (collective timeout {timeout_s:g} "
           f"s). Missing shards in {out}: {', '.join(st['missing']) or 'none'}. Cause: {type(e).__name__}: "
           f"{(str(e).splitlines() or [''])[0][:300]}")
    raise DistributedSamplingError(msg) from e


# -- manifest and merging -------------------------------------------------------------------------

def _read_manifest(d: Path) -> dict:
    p = d / MANIFEST
    if not d.is_dir():
        raise FileNotFoundError(f"shard directory {str(d)!r} does not exist")
    if not p.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {str(d)!r} (not a steindiff sample-dist output directory)")
    with open(p) as f:
        m = json.load(f)
    if m.get("schema") != MANIFEST_SCHEMA:
        raise ValueError(f"{p}: unknown manifest schema {m.get('schema')!r}")
    return m


def shard_status(out_dir: str | os.PathLike) -> dict:
    """Which of the manifest's shards are present, missing, or stale (written by another run)."""
    d = Path(out_dir)
    m = _read_manifest(d)
    present, missing, stale = [], [], []
    for s in m["shards"]:
        p = d / s["file"]
        if not p.is_file():
            missing.append(s["file"])
            continue
        try:
            with np.load(p) as z:
                rid = str(z["run_id"])
        except Exception:  # unreadable: treat as stale
            rid = None
        (present if rid == m["run_id"] else stale).append(s["file"])
    return {"run_id": m["run_id"], "world_size": m["world_size"], "n": m["n"], "status": m.get("status"),
            "expected": [s["file"] for s in m["shards"]], "present": present, "missing": missing, "stale": stale}


def merge_shards(out_dir: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Merge the shards of ``out_dir`` into one ``.npz`` at ``out`` (``samples`` in global order,
    ``sigmas``, ``gammas``, ``config`` as JSON).  Raises :class:`MissingShardsError` naming every missing
    or stale shard, and ValueError if the shards disagree (indices, ``gamma`` trajectory)."""
    d = Path(out_dir)
    m = _read_manifest(d)
    st = shard_status(d)
    if st["missing"] or st["stale"]:
        labels = {"missing": "missing", "stale": "stale (from another run)"}
        parts = [f"{labels[k]} {', '.join(st[k])}" for k in labels if st[k]]
        bad = len(st["missing"]) + len(st["stale"])
        raise MissingShardsError(f"cannot merge {str(d)!r}: {bad} of {m['world_size']} shards unusable: "
                                 f"{'; '.join(parts)} (manifest status: {m.get('status')}); rerun the job with the "
                                 "same configuration")
    samples, gammas, sigmas = [], None, None
    for s in sorted(m["shards"], key=lambda s: s["start"]):
        with np.load(d / s["file"]) as z:
            idx = z["indices"]
            if not np.array_equal(idx, np.arange(s["start"], s["stop"])):
                raise ValueError(f"{s['file']}: indices do not match the manifest's range [{s['start']}, {s['stop']})")
            samples.append(z["samples"])
            g = z["gammas"]
            if gammas is None:
                gammas, sigmas = g, z["sigmas"]
            elif g.shape != gammas.shape or not np.allclose(g, gammas, rtol=1e-9, atol=1e-12):
                raise ValueError(f"{s['file']}: its gamma trajectory differs from the other shards' (the ranks "
                                 "were not synchronized)")
    x = np.concatenate(samples)
    if x.shape[0] != m["n"]:
        raise ValueError(f"merged {x.shape[0]} samples, the manifest expects {m['n']}")
    save_npz(out, samples=x, sigmas=sigmas, gammas=gammas, config=np.array(json.dumps(m["config"])))
    return {"out": str(out), "n": int(x.shape[0]), "world_size": m["world_size"], "shards": len(m["shards"]),
            "run_id": m["run_id"], "config": m["config"]}
