"""Calibrated gamma schedules: fixed per-step ``gamma_k`` with no extra passes.

A schedule is estimated once for a (model, solver, time schedule, NFE, coordinates, variant) from a
calibration batch (:func:`calibrate`) and saved as JSON.  Applying it costs nothing beyond the plain
solver, and each sample no longer depends on its batchmates.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import save_json
from ..noise import coordinate_scales
from ..solvers import Step, StepOperator
from .base import rescaled_update

__all__ = ["GammaSchedule", "load_gamma_schedule", "SCHEMA"]

SCHEMA = "steindiff.gamma-schedule/1"


class GammaSchedule:
    """Apply fixed ``gammas`` (one per step) in coordinates ``coords``:
    ``x_{k-1} = x_k - gamma_k (x_k - T(x_k))`` (SteinDiff's rectified update with a given ``gamma``)."""

    def __init__(self, gammas: Sequence[float], coords: str = "ve", meta: dict | None = None):
        g = [float(v) for v in gammas]
        if not g or not all(math.isfinite(v) for v in g):
            raise ValueError(f"gamma schedule must be a non-empty list of finite numbers, got {list(gammas)!r}")
        coordinate_scales(coords, 1.0, 0.5)
        self.gammas, self.coords, self.meta = g, coords, dict(meta or {})
        self.name = self.meta.get("name", "gamma-schedule")

    def step(self, op: StepOperator, x: torch.Tensor) -> tuple[torch.Tensor, Step, dict]:
        if op.i >= len(self.gammas) or len(op.sigmas) - 1 != len(self.gammas):
            raise ValueError(f"gamma schedule has {len(self.gammas)} steps but the solve has {len(op.sigmas) - 1}")
        t0 = time.perf_counter()
        with torch.no_grad():
            st = op(x)
        a, a_next, _ = coordinate_scales(self.coords, op.sigma, op.sigma_next)
        g = self.gammas[op.i]
        if g == 1.0:
            x_next = st.x_next
        else:
            x_c = a * x
            x_next = rescaled_update(st.x_next, x_c - a_next * st.x_next, g, a_next)
        rec = {"step": op.i, "sigma": op.sigma, "sigma_next": op.sigma_next, "gamma": g, "extra_passes": 0,
               "wall_s": time.perf_counter() - t0}
        return x_next, st, rec

    def check_matches(self, **expected: Any) -> None:
        """Refuse a schedule made for another configuration, naming every mismatch."""
        bad = [f"{k}: file has {self.meta.get(k)!r}, requested {v!r}" for k, v in expected.items()
               if k in self.meta and v is not None and self.meta.get(k) != v]
        if bad:
            raise ValueError("gamma schedule does not match this run (" + "; ".join(bad) + ")")

    def save(self, path: str | Path) -> None:
        save_json(path, {"schema": SCHEMA, **self.meta, "coords": self.coords, "gammas": self.gammas})


def load_gamma_schedule(path: str | Path) -> GammaSchedule:
    """Load and validate a schedule file; a corrupt or truncated file is a clear ``ValueError``."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"gamma schedule file {str(p)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"gamma schedule file {str(p)!r} is corrupt or truncated: {e}") from None
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
        raise ValueError(f"{str(p)!r} is not a steindiff gamma schedule (expected schema {SCHEMA!r})")
    for key in ("gammas", "coords", "model", "solver", "nfe", "schedule", "sigmas"):
        if key not in obj:
            raise ValueError(f"gamma schedule file {str(p)!r} lacks the field {key!r}")
    gammas = obj.pop("gammas")
    coords = obj.pop("coords")
    obj.pop("schema")
    if not isinstance(gammas, list) or len(gammas) != len(obj["sigmas"]) - 1:
        raise ValueError(f"gamma schedule file {str(p)!r}: {len(gammas) if isinstance(gammas, list) else 'no'} gammas "
                         f"for {len(obj['sigmas']) - 1} steps")
    try:
        return GammaSchedule(gammas, coords, obj)
    except (TypeError, ValueError) as e:
        raise ValueError(f"gamma schedule file {str(p)!r}: {e}") from None
