"""Metrics: mixture metrics against exact distributions, and image metrics (digits, photo patches)."""

from typing import Any

import torch

from .mixture import mixture_metrics, mmd_rbf, mode_tv, nll_per_dim, sliced_w2, traj_err

__all__ = ["mixture_metrics", "mmd_rbf", "mode_tv", "nll_per_dim", "sliced_w2", "traj_err", "image_model_metrics"]


def image_model_metrics(samples: torch.Tensor, spec: Any, *, seed: int = 0) -> dict[str, Any]:
    """The image metrics of an image model's samples, each with its floor: the patch metrics
    (:func:`~steindiff.metrics.patches.patch_metrics`) for models of photo patches (``info["metrics"]`` is
    ``"patches"``), else the digits metrics (:func:`~steindiff.metrics.image.image_metrics`)."""
    from .image import image_metrics
    from .patches import patch_metrics

    info = getattr(spec, "info", spec) or {}
    return (patch_metrics if info.get("metrics") == "patches" else image_metrics)(samples, spec, seed=seed)
