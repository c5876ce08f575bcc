"""Named models for the CLI and benchmarks: ``gmm:<preset>`` (exact mixtures on the VE process),
``gmm:<preset>-flow`` (the same mixtures seen through flow matching), and more registered by other modules
(e.g. the shipped digits and patches models)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..noise import FLOW_T_DELTA, FlowProcess, NoiseProcess, VEProcess
from ..schedules import FlowSchedule
from .denoisers import FlowDenoiser
from .gmm import GaussianMixture, get_gmm

__all__ = ["ModelSpec", "load_model", "register_model_loader", "flow_mixture", "FLOW_SUFFIX", "FLOW_GRID_SUFFIXES"]

#: ``gmm:<preset>`` + this suffix: the mixture as a flow-matching model (:func:`flow_mixture`); ``-flow-unipc``: the
#: same model whose ``flow`` schedule is UniPC's flow-sigma grid (which starts at t = 1 too, unlike DPM-Solver's).
FLOW_SUFFIX = "-flow"
FLOW_GRID_SUFFIXES = {"-flow": "euler", "-flow-unipc": "unipc"}


@dataclass
class ModelSpec:
    """A denoiser with what sampling it needs: its noise process and the shape of one sample.

    ``gmm`` is set for exact mixtures (enables exact metrics, exact divergence and the oracle).
    ``info`` carries loader-specific extras (e.g. reference data for image metrics, ``calibration_defaults``:
    the options :func:`steindiff.calibration.calibration_options` takes for this model unless told otherwise).
    ``fingerprint``: the model's identity for calibration caches, given by the user where its contents cannot
    be read (default: a hash of its contents, :func:`steindiff.calibration.model_fingerprint`).
    """

    name: str
    denoiser: Callable[..., torch.Tensor]
    process: NoiseProcess
    sample_shape: tuple[int, ...]
    gmm: GaussianMixture | None = None
    info: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None

    @property
    def device(self) -> torch.device | None:
        """The device of the denoiser (``None`` when it cannot be told, e.g. a plain function)."""
        from ..device import model_device

        return model_device(self.gmm if self.gmm is not None else self.denoiser)

    def to(self, device: str | torch.device) -> "ModelSpec":
        """Move the denoiser (an ``nn.Module`` or anything with ``.to``) and the mixture to ``device``,
        in place; returns ``self``.  Reference data in ``info`` stays where it is (metrics move samples)."""
        device = torch.device(device)
        if self.gmm is not None:
            self.gmm.to(device)
        if self.denoiser is not self.gmm and callable(getattr(self.denoiser, "to", None)):
            moved = self.denoiser.to(device)
            if moved is not None:
                self.denoiser = moved
        return self


_LOADERS: list[tuple[Callable[[str], bool], Callable[[str], ModelSpec]]] = []


def register_model_loader(matches: Callable[[str], bool], load: Callable[[str], ModelSpec]) -> None:
    """Add a loader tried (after the built-in ones) for model names where ``matches(name)``."""
    _LOADERS.append((matches, load))


def flow_mixture(gmm: GaussianMixture, grid: str = "euler") -> ModelSpec:
    """An exact mixture as a flow-matching model: its velocity network (:meth:`GaussianMixture.velocity_net`,
    SD3's model time ``1000 t``) behind a :class:`~steindiff.models.FlowDenoiser`, on a
    :class:`~steindiff.noise.FlowProcess` from ``t_max = 1 - FLOW_T_DELTA`` (the stand-in for ``t = 1``, where flow
    pipelines start) down to ``sigma_min = 0.002`` (the VE presets' lowest level), with the flow schedule of
    shift 1 on ``grid`` (:class:`~steindiff.schedules.FlowSchedule`: FlowMatchEuler's ``euler``, UniPC's
    ``unipc``).  Sampling goes through the adapter, as for a user's flow model; ``gmm`` keeps the exact metrics."""
    process = FlowProcess(0.002 / 1.002, 1.0 - FLOW_T_DELTA, FlowSchedule(grid=grid))
    den = FlowDenoiser(gmm.velocity_net(1000.0), process, "velocity", time_scale=1000.0)
    suffix = {v: k for k, v in FLOW_GRID_SUFFIXES.items()}[grid]
    return ModelSpec(name=gmm.name + suffix, denoiser=den, process=process, sample_shape=(gmm.dim,), gmm=gmm)


def load_model(name: str) -> ModelSpec:
    """Resolve a model name: ``gmm:<preset>``, ``gmm:<preset>-flow`` (and ``-flow-unipc``: :func:`flow_mixture`) or
    any registered name/path."""
    for suffix, grid in FLOW_GRID_SUFFIXES.items():
        if name.startswith("gmm:") and name.endswith(suffix):
            return flow_mixture(get_gmm(name[: -len(suffix)]), grid)
    if name.startswith("gmm:"):
        gmm = get_gmm(name)
        # exact mixtures compute in float64, and so do their calibrations unless told otherwise
        return ModelSpec(name=gmm.name, denoiser=gmm, process=VEProcess(0.002, 80.0), sample_shape=(gmm.dim,), gmm=gmm,
                         info={"calibration_defaults": {"dtype": "float64"}})
    for matches, load in _LOADERS:
        if matches(name):
            return load(name)
    raise ValueError(f"unknown model {name!r}: {_why_not(name)}; use gmm:<preset> (e.g. gmm:image64, or "
                     "gmm:image64-flow for the mixture as a flow-matching model), digits "
                     "or patches (the shipped models) or a checkpoint folder written by `steindiff train` "
                     "(config.json, model.safetensors)")


def _why_not(name: str) -> str:
    """What is missing for ``name`` to be a checkpoint folder (the last kind of name tried)."""
    p = Path(name)
    if not p.exists():
        return f"no such folder {name!r}"
    if not p.is_dir():
        return f"{name!r} is a file, not a checkpoint folder"
    if (p / "model_index.json").is_file():
        return f"{name!r} is a diffusers pipeline (load it from Python: steindiff.integrations.diffusers)"
    if (p / "config.json").is_file():
        return f"{p / 'config.json'} is not a steindiff checkpoint config, and model.safetensors is missing"
    return f"folder {name!r} has no config.json"
