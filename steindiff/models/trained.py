"""Trained U-Net checkpoints as named models: ``digits``, ``digits-flow`` and ``patches`` (shipped) and any checkpoint
folder.

``load_model("digits")`` returns the shipped EDM model of the 8x8 digits (weights in ``steindiff/weights/digits``),
``load_model("digits-flow")`` a rectified-flow model of the same digits with the same U-Net
(``steindiff/weights/digits_flow``, ``steindiff train --objective flow``), ``load_model("patches")`` the EDM model
of 32x32 RGB photo patches (``steindiff/weights/patches``); ``load_model("path/to/checkpoint")`` loads a folder
written by ``steindiff train``. The denoiser is ``EDMPrecond(unet)`` (``VPDenoiser`` for a VP epsilon model,
``FlowDenoiser`` for a flow model) in eval mode with frozen parameters. When the training data can be reloaded,
``info`` carries the held-out and training images of the recorded split, and ``info["metrics"]`` names the image
metrics that fit them (``patches``: :func:`steindiff.metrics.patches.patch_metrics`, else ``digits``:
:func:`steindiff.metrics.image.image_metrics`); ``info["sampling_defaults"]`` the solver, schedule and NFE of
the folder's ``sampling_defaults.json``, and ``info["calibrations"]`` its folder of calibrations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..data import DataError, load_dataset
from .checkpoint import build_denoiser, is_checkpoint_dir, load_checkpoint
from .registry import ModelSpec, register_model_loader

__all__ = ["DIGITS_DIR", "DIGITS_FLOW_DIR", "PATCHES_DIR", "SHIPPED", "SAMPLING_DEFAULTS_FILE", "load_trained",
           "is_trained_checkpoint"]

DIGITS_DIR = Path(__file__).resolve().parent.parent / "weights" / "digits"
DIGITS_FLOW_DIR = DIGITS_DIR.parent / "digits_flow"
PATCHES_DIR = DIGITS_DIR.parent / "patches"
#: A model folder's declared sampling configuration (``info["sampling_defaults"]``): the solver, schedule and NFE
#: the command line samples with when not told (the shipped models: ones that ship a calibration), and ``n``, the
#: number of samples ``steindiff sample`` draws when not told.
SAMPLING_DEFAULTS_FILE = "sampling_defaults.json"
#: The models shipped with the package, by name.
SHIPPED = {"digits": DIGITS_DIR, "digits-flow": DIGITS_FLOW_DIR, "patches": PATCHES_DIR}


def is_trained_checkpoint(name: str) -> bool:
    """A shipped model's name, or a folder holding a steindiff ``config.json`` or a ``model.safetensors``
    (folders of other formats, e.g. diffusers pipelines with ``model_index.json``, are left alone)."""
    if name in SHIPPED:
        return True
    p = Path(name)
    if not p.is_dir() or (p / "model_index.json").exists():
        return False
    return is_checkpoint_dir(p) or (p / "model.safetensors").is_file()


def _reference_data(config: dict[str, Any]) -> dict[str, Any]:
    """Held-out and training images of the checkpoint's split, when its data can be reloaded."""
    data = config["data"]
    src = data.get("source")
    try:
        ds = load_dataset(src)
    except (DataError, OSError, TypeError, ImportError) as e:  # ImportError: scikit-learn absent (digits)
        return {"data_note": f"training data not available ({e})"}
    if ds.fingerprint() != data.get("fingerprint"):
        return {"data_note": f"training data at {src!r} changed since training (fingerprint differs)"}
    held = torch.as_tensor(data["holdout"]["indices"], dtype=torch.long)
    mask = torch.ones(ds.x.shape[0], dtype=torch.bool)
    mask[held] = False
    info: dict[str, Any] = {"heldout": ds.x[held], "train": ds.x[mask],
                            "metrics": "patches" if ds.name == "patches" else "digits"}
    if ds.labels is not None:
        info["heldout_labels"], info["train_labels"] = ds.labels[held], ds.labels[mask]
    return info


def _sampling_defaults(path: Path) -> dict[str, Any]:
    """A model's declared sampling configuration (``solver``, ``schedule``, ``nfe``; ``n``: how many samples
    ``steindiff sample`` draws), checked."""
    from ..schedules import SCHEDULES
    from ..solvers import SOLVERS

    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable sampling defaults: {e}") from None
    counts = ("nfe", "n")
    ok = (isinstance(d, dict) and set(d) <= {"solver", "schedule", *counts} and d.get("solver", "euler") in SOLVERS
          and d.get("schedule", "karras") in SCHEDULES
          and all(isinstance(d.get(k, 1), int) and d.get(k, 1) >= 1 for k in counts))
    if not ok:
        raise ValueError(f"{path}: sampling defaults must be an object with solver (one of {', '.join(SOLVERS)}), "
                         f"schedule (one of {', '.join(SCHEDULES)}), nfe and n (integers >= 1), got {d!r}")
    return d


def load_trained(name: str) -> ModelSpec:
    """ModelSpec of a shipped model or of a checkpoint folder (see the module doc)."""
    path = SHIPPED.get(name, Path(name))
    if name in SHIPPED and not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'}: the shipped {name} model is "
                                "missing from this installation")
    net, config = load_checkpoint(path)
    net.requires_grad_(False)
    denoiser, process = build_denoiser(net, config)
    denoiser.eval().requires_grad_(False)
    shape = tuple(int(s) for s in config["data"]["shape"])
    info: dict[str, Any] = {"kind": "image", "path": str(path), "config": config}
    if (path / "calibrations").is_dir():  # fitted once for these weights (steindiff bench --calibration-dir)
        info["calibrations"] = str(path / "calibrations")
        if (path / "calibrations" / "defaults.json").is_file():  # the options they were fitted with
            info["calibration_defaults"] = json.loads((path / "calibrations" / "defaults.json").read_text())
    if (path / SAMPLING_DEFAULTS_FILE).is_file():  # the solver, schedule and NFE to sample with unless told
        info["sampling_defaults"] = _sampling_defaults(path / SAMPLING_DEFAULTS_FILE)
    info.update(_reference_data(config))
    spec_name = name if name in SHIPPED else os.fspath(path)
    return ModelSpec(name=spec_name, denoiser=denoiser, process=process, sample_shape=shape, info=info)


register_model_loader(is_trained_checkpoint, load_trained)
