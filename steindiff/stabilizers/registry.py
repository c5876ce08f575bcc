"""Stabilizers by name, for the CLI and benchmarks."""

from __future__ import annotations

from typing import Any, Callable

from .marginal import EnergyMatchingStabilizer
from .stein import SteinStabilizer

__all__ = ["STABILIZERS", "make_stabilizer"]


def _needs_mixture(name: str, spec: Any) -> Any:
    gmm = getattr(spec, "gmm", None)
    if gmm is None:
        raise ValueError(f"stabilizer {name!r} needs an exact-score mixture model (gmm:...), got {getattr(spec, 'name', spec)!r}")
    return gmm


def _stein(name: str, spec: Any, **kw: Any) -> SteinStabilizer:
    gmm = getattr(spec, "gmm", None)
    if gmm is not None:
        kw.setdefault("denoiser_divergence", gmm.divergence)
    return SteinStabilizer("stein", **kw)


STABILIZERS: dict[str, Callable[..., Any]] = {
    "none": lambda name, spec, **kw: None,
    "stein": _stein,
    "stein-sc": lambda name, spec, **kw: SteinStabilizer("lookahead", **{k: v for k, v in kw.items() if k not in ("probes", "divergence")}),
    "stein-exact": lambda name, spec, **kw: SteinStabilizer(
        "stein", divergence="exact", denoiser_divergence=_needs_mixture(name, spec).divergence,
        **{k: v for k, v in kw.items() if k not in ("probes", "divergence")}),
    "stein-oracle": lambda name, spec, **kw: SteinStabilizer(
        "oracle", clean_target=_needs_mixture(name, spec).denoise, denoiser_divergence=_needs_mixture(name, spec).divergence,
        **{k: v for k, v in kw.items() if k not in ("probes", "divergence")}),
    # ours (issue: Stein stabilization that helps); see docs/stabilizers.md
    "stein-tr": lambda name, spec, **kw: _stein(name, spec, **{"gamma_min": 0.8, "gamma_max": 1.25, **_no_none(kw)}),
    "stein-energy": lambda name, spec, **kw: EnergyMatchingStabilizer(**_no_none(kw)),
}


# What ``--stabilizer auto`` means, chosen by evidence: the rule of steindiff/bench/auto.py applied
# with benchmarks/select_auto.py to the committed results in docs/results (README, "A default
# chosen by evidence").  "none" when no variant meets the rule.
AUTO = "none"
STABILIZERS["auto"] = lambda name, spec, **kw: make_stabilizer(AUTO, spec, **kw)


def _no_none(kw: dict) -> dict:
    """Drop options left at ``None`` and clip bounds left at the literal default, so a variant's own defaults apply."""
    out = {k: v for k, v in kw.items() if v is not None}
    if out.get("gamma_min") == 0.0:
        out.pop("gamma_min")
    return out


def make_stabilizer(name: str, spec: Any = None, **options: Any) -> Any:
    """A stabilizer by name (``none`` gives ``None``), for the model ``spec`` (a
    :class:`~steindiff.models.registry.ModelSpec`); ``options`` go to the stabilizer (``coords``,
    ``probes``, ``gamma_min``, ``seed``, ...)."""
    if name not in STABILIZERS:
        raise ValueError(f"unknown stabilizer {name!r}; choose one of {', '.join(STABILIZERS)}")
    return STABILIZERS[name](name, spec, **options)
