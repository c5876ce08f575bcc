"""Calibrated gamma schedules: fixed per-step parameters with no extra passes.

A schedule is estimated once for a (model, solver, time schedule, NFE, coordinates, variant) from a
calibration batch (:func:`calibrate`) and saved as JSON.  Applying it costs nothing beyond the plain
solver, and each sample no longer depends on its batchmates.

Beyond one ``gamma_k`` per step, a schedule may carry two more kinds of per-step parameter, both applied
around any solver's step operator (no solver knows of them):

- ``model_sigmas``: the noise level the model is given at each of the plan's levels (LD3's decoupled
  model-input times, Tong et al. 2025): the solver steps over ``sigmas`` while the model sees
  ``D(x, model_sigmas[j])`` wherever the solver evaluates it at ``sigmas[j]``;
- ``history``: per-step corrections of the step's weights over the past denoised outputs (S4S- and
  GS-style learned coefficients): ``T'(x_k) = T(x_k) + (1 - sigma_{k+1}/sigma_k) sum_j c_{k,j} (D_k - D_{k-j})``,
  scaled like a VE step's data term, from the ``denoised`` outputs the steps expose.

Files that carry either are written as ``steindiff.gamma-schedule/2`` with a ``requires`` list (what a
loader must apply), so that a loader of the first generation refuses them instead of dropping them; files
with gammas and noise levels only stay ``/1``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import save_json
from ..noise import coordinate_scales
from ..solvers import Step, StepOperator
from ..solvers.base import Scalar
from .base import rescaled_update

__all__ = ["GammaSchedule", "load_gamma_schedule", "SCHEMA", "SCHEMA_V2", "SCHEMAS", "EXTRA_PARAMETERS",
           "HISTORY_KEY"]

SCHEMA = "steindiff.gamma-schedule/1"
#: Schedules with parameters beyond gammas and noise levels (``requires`` names them).
SCHEMA_V2 = "steindiff.gamma-schedule/2"
SCHEMAS = (SCHEMA, SCHEMA_V2)
#: The parameters beyond gammas and noise levels that this version applies.
EXTRA_PARAMETERS = ("model_sigmas", "history")
#: Where the solver's state carries the past denoised outputs the ``history`` corrections use (newest first).
HISTORY_KEY = "_schedule_denoised"


def _value(v: Scalar) -> float:
    """The value of a float or of a 0-d tensor (detached: a fit's parameter)."""
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def _finite(v: Scalar) -> bool:
    return math.isfinite(_value(v))


def _scalar(v: Any) -> Scalar:
    """A float, or a 0-d tensor kept as is (a fit's parameter)."""
    return v if isinstance(v, torch.Tensor) else float(v)


class _ModelLevels:
    """The step's :class:`~steindiff.solvers.Denoise` with the model given ``model_sigmas[j]`` wherever the
    solver evaluates it at ``sigmas[j]``; every other attribute (pass counts, checks) is the wrapped one's."""

    def __init__(self, denoise: Any, sigmas: Sequence[Scalar], model_sigmas: Sequence[Scalar]):
        self.denoise, self.sigmas, self.model_sigmas = denoise, sigmas, model_sigmas

    def __getattr__(self, name: str) -> Any:
        return getattr(self.denoise, name)

    def __call__(self, x: torch.Tensor, sigma: Scalar, step: int) -> torch.Tensor:
        levels = self.sigmas[: len(self.model_sigmas)]
        j = next((j for j, s in enumerate(levels) if s is sigma), None)
        if j is None:
            value = _value(sigma)
            j = next((j for j, s in enumerate(levels) if _value(s) == value), None)
            if j is None:
                raise ValueError(f"step {step}: the solver evaluates the model at sigma={value:.6g}, which is not one "
                                 "of the plan's noise levels, so the schedule's model noise levels cannot apply")
        return self.denoise(x, self.model_sigmas[j], step)


class GammaSchedule:
    """Apply fixed ``gammas`` (one per step) in coordinates ``coords``:
    ``x_{k-1} = x_k - gamma_k (x_k - T(x_k))`` (SteinDiff's rectified update with a given ``gamma``).

    ``model_sigmas`` (one per step: the model's noise level at each positive level of the solve) and
    ``history`` (one list per step: ``c_{k,1..J_k}``, at most ``k`` entries) are the optional parameters of
    the module docstring, applied to ``T`` before the rescaling.  Parameters may be floats or, inside a
    gradient fit, 0-d tensors; the step builds a graph only when one of them, a noise level or ``x``
    requires grad."""

    def __init__(self, gammas: Sequence[Scalar], coords: str = "ve", meta: dict | None = None, *,
                 model_sigmas: Sequence[Scalar] | None = None, history: Sequence[Sequence[Scalar]] | None = None):
        g = [_scalar(v) for v in gammas]
        if not g or not all(_finite(v) for v in g):
            raise ValueError(f"gamma schedule must be a non-empty list of finite numbers, got {list(gammas)!r}")
        coordinate_scales(coords, 1.0, 0.5)
        if model_sigmas is not None:
            model_sigmas = [_scalar(v) for v in model_sigmas]
            if len(model_sigmas) != len(g) or not all(_finite(v) and _value(v) > 0 for v in model_sigmas):
                raise ValueError(f"model_sigmas must hold one positive finite noise level per step ({len(g)}), "
                                 f"got {model_sigmas!r}")
        if history is not None:
            history = [[_scalar(c) for c in row] for row in history]
            if len(history) != len(g) or not all(_finite(c) for row in history for c in row):
                raise ValueError(f"history must hold one list of finite coefficients per step ({len(g)}), "
                                 f"got {history!r}")
            bad = [k for k, row in enumerate(history) if len(row) > k]
            if bad:
                raise ValueError(f"history: step {bad[0]} has {len(history[bad[0]])} coefficients but only {bad[0]} "
                                 "past denoised outputs")
            if not any(isinstance(c, torch.Tensor) or c != 0.0 for row in history for c in row):
                history = None
        self.gammas, self.coords, self.meta = g, coords, dict(meta or {})
        self.model_sigmas, self.history = model_sigmas, history
        self.depth = max((len(row) for row in history), default=0) if history is not None else 0
        self._tensors = [v for v in (*g, *(model_sigmas or []), *(c for row in history or [] for c in row))
                         if isinstance(v, torch.Tensor)]  # a fit's parameters: a step tracks grad through them
        self.name = self.meta.get("name", "gamma-schedule")

    @property
    def requires(self) -> list[str]:
        """The parameters beyond gammas this schedule carries (:data:`EXTRA_PARAMETERS`)."""
        return [k for k in EXTRA_PARAMETERS if getattr(self, k) is not None]

    def _tracks_grad(self, op: StepOperator, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        levels = (op.sigma, op.sigma_next)
        return x.requires_grad or any(isinstance(v, torch.Tensor) and v.requires_grad for v in levels) or any(
            v.requires_grad for v in self._tensors)

    def step(self, op: StepOperator, x: torch.Tensor) -> tuple[torch.Tensor, Step, dict]:
        if op.i >= len(self.gammas) or len(op.sigmas) - 1 != len(self.gammas):
            raise ValueError(f"gamma schedule has {len(self.gammas)} steps but the solve has {len(op.sigmas) - 1}")
        t0 = time.perf_counter()
        with contextlib.nullcontext() if self._tracks_grad(op, x) else torch.no_grad():
            run = op if self.model_sigmas is None else op.with_denoise(
                _ModelLevels(op.denoise, op.sigmas, self.model_sigmas))
            st = run(x)
            if self.history is not None:
                past = op.state.get(HISTORY_KEY, []) if isinstance(op.state, dict) else []
                coef = self.history[op.i][: len(past)]
                x_t = st.x_next
                if coef:
                    corr = sum(c * (st.denoised - d) for c, d in zip(coef, past))
                    x_t = x_t + (1.0 - op.sigma_next / op.sigma) * corr
                st = Step(x_t, st.denoised, {**st.state, HISTORY_KEY: ([st.denoised] + list(past))[: self.depth]})
            a, a_next, _ = coordinate_scales(self.coords, op.sigma, op.sigma_next)
            g = self.gammas[op.i]
            if not isinstance(g, torch.Tensor) and g == 1.0:
                x_next = st.x_next
            else:
                x_c = a * x
                x_next = rescaled_update(st.x_next, x_c - a_next * st.x_next, g, a_next)
        rec = {"step": op.i, "sigma": _value(op.sigma), "sigma_next": _value(op.sigma_next), "gamma": _value(g),
               "extra_passes": 0, "wall_s": time.perf_counter() - t0}
        return x_next, st, rec

    def check_matches(self, **expected: Any) -> None:
        """Refuse a schedule made for another configuration, naming every mismatch."""
        bad = [f"{k}: file has {self.meta.get(k)!r}, requested {v!r}" for k, v in expected.items()
               if k in self.meta and v is not None and self.meta.get(k) != v]
        if bad:
            raise ValueError("gamma schedule does not match this run (" + "; ".join(bad) + ")")

    def save(self, path: str | Path) -> None:
        """JSON: ``/1`` for gammas (and noise levels in ``meta``), ``/2`` with ``requires`` when it carries
        ``model_sigmas`` or ``history`` (so that a first-generation loader refuses it)."""
        out: dict[str, Any] = {"schema": SCHEMA_V2 if self.requires else SCHEMA, **self.meta, "coords": self.coords,
                               "gammas": [_value(g) for g in self.gammas]}
        if self.requires:
            out["requires"] = self.requires
        if self.model_sigmas is not None:
            out["model_sigmas"] = [_value(v) for v in self.model_sigmas]
        if self.history is not None:
            out["history"] = [[_value(c) for c in row] for row in self.history]
        save_json(path, out)


def load_gamma_schedule(path: str | Path) -> GammaSchedule:
    """Load and validate a schedule file; a corrupt or truncated file is a clear ``ValueError``."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"gamma schedule file {str(p)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"gamma schedule file {str(p)!r} is corrupt or truncated: {e}") from None
    schema = obj.get("schema") if isinstance(obj, dict) else None
    if isinstance(schema, str) and schema.startswith("steindiff.gamma-schedule/") and schema not in SCHEMAS:
        raise ValueError(f"gamma schedule file {str(p)!r} has schema {schema!r}, written by a newer steindiff; this "
                         f"version reads {', '.join(SCHEMAS)}: update steindiff or calibrate again")
    if schema not in SCHEMAS:
        raise ValueError(f"{str(p)!r} is not a steindiff gamma schedule (expected schema {SCHEMA!r})")
    requires = obj.pop("requires", [])
    unknown = [r for r in requires if r not in EXTRA_PARAMETERS] if isinstance(requires, list) else [requires]
    if unknown:
        raise ValueError(f"gamma schedule file {str(p)!r} carries parameters this version of steindiff cannot apply "
                         f"({', '.join(map(str, unknown))}; it applies {', '.join(EXTRA_PARAMETERS)}): sampling "
                         "without them would not be the calibrated sampler; update steindiff or calibrate again")
    missing = [r for r in requires if r not in obj]
    if missing:
        raise ValueError(f"gamma schedule file {str(p)!r} requires {', '.join(missing)} but lacks the field(s)")
    for key in ("gammas", "coords", "model", "solver", "nfe", "schedule", "sigmas"):
        if key not in obj:
            raise ValueError(f"gamma schedule file {str(p)!r} lacks the field {key!r}")
    gammas = obj.pop("gammas")
    coords = obj.pop("coords")
    obj.pop("schema")
    if not isinstance(gammas, list) or len(gammas) != len(obj["sigmas"]) - 1:
        raise ValueError(f"gamma schedule file {str(p)!r}: {len(gammas) if isinstance(gammas, list) else 'no'} gammas "
                         f"for {len(obj['sigmas']) - 1} steps")
    extra = {k: obj.pop(k) for k in EXTRA_PARAMETERS if k in obj}
    try:
        return GammaSchedule(gammas, coords, obj, **extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"gamma schedule file {str(p)!r}: {e}") from None
