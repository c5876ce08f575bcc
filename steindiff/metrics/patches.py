"""Image metrics for models of natural-image patches (``patches``, :func:`steindiff.data.load_patches_dataset`).

- ``patch_fd``: Fréchet distance (Heusel et al. 2017) between Gaussians fitted to the 64 features of the
  project's own small patch classifier, shipped in ``steindiff/weights/patch_classifier`` and trained
  (``benchmarks/train_patch_classifier.py``) to tell which photograph a patch comes from; its held-out
  accuracy is in its ``config.json``.  Comparable only with itself, never with Inception FID.
- ``spectrum``: radially averaged power-spectrum distance, the RMS over frequency bands of the log10
  ratio of the mean power spectra (:func:`spectrum_error`), as in the spectral analyses of generated
  images of Durall et al. 2020 and Dzanic et al. 2020.  ``spectrum_high``: the signed log10 ratio in
  the highest band: above 0 residual noise, below 0 blur (the artifacts of large steps).
- ``pixel_sw2``: sliced Wasserstein-2 in pixel space (:func:`~steindiff.metrics.mixture.sliced_w2`).

:func:`patch_metrics` compares samples with the held-out patches (photo regions never seen in training)
and reports each metric with its floor: the same metric of as many real training patches as samples
against the same held-out patches, averaged over ``floor_draws`` draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .image import _reference, classifier_features, frechet_distance, load_classifier
from .mixture import sliced_w2

__all__ = ["PatchClassifier", "load_patch_classifier", "patch_features", "radial_spectrum", "spectrum_error",
           "patch_metrics", "PATCH_CLASSIFIER_DIR", "PATCH_METRICS"]

PATCH_CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "weights" / "patch_classifier"
PATCH_CLASSIFIER_SCHEMA = "steindiff.patch_classifier/1"
#: The metrics of :func:`patch_metrics`, each with a ``*_floor``; the first is the primary one.
PATCH_METRICS = ("patch_fd", "spectrum", "spectrum_high", "pixel_sw2")


class PatchClassifier(nn.Module):
    """Small CNN on ``(B, 3, H, W)`` patches in [-1, 1] (``H``, ``W`` multiples of 8; trained on 32x32):
    four 3x3 convolutions, three max-pools, a global average pool and a linear layer give the 64
    ``features`` (after a ReLU, divided by ``feature_scale``, their RMS on the training patches)."""

    def __init__(self, width: int = 24, n_features: int = 64, n_classes: int = 10, feature_scale: float = 1.0):
        super().__init__()
        self.feature_scale = float(feature_scale)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, n_features), nn.ReLU(),
        )
        self.head = nn.Linear(n_features, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(f"the patch classifier needs (N, 3, H, W) images, H and W multiples of 8, got "
                             f"{tuple(x.shape)}")
        return self.body(x) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x) * self.feature_scale)


def load_patch_classifier(path: str | Path | None = None) -> PatchClassifier:
    """The shipped patch classifier (eval mode, frozen), or one saved in the same format."""
    return load_classifier(str(path or PATCH_CLASSIFIER_DIR), PatchClassifier, PATCH_CLASSIFIER_SCHEMA)  # type: ignore


def _check(x: Any, what: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[2:]) < 16:
        raise ValueError(f"{what}: patch metrics need (N, 3, H, W) images with H, W >= 16, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: images contain NaN or Inf")
    return x


def patch_features(x: torch.Tensor, classifier: PatchClassifier | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, 64) float64, predicted scenes (N,))`` of patches clamped to [-1, 1]."""
    return classifier_features(classifier or load_patch_classifier(), _check(x, "images"), batch_size=512)


def radial_spectrum(x: torch.Tensor, bands: int = 8) -> torch.Tensor:
    """Radially averaged power spectrum of ``(N, C, H, W)`` images: ``|FFT2(x)|^2 / (H W)`` averaged over
    the images, the channels and the frequencies of each of ``bands`` rings of equal width in radial
    frequency ``(0, 1/2]`` cycles per pixel (the mean and the corners beyond 1/2 left out); float64 ``(bands,)``."""
    x = torch.as_tensor(x).to(torch.float64)
    h, w = x.shape[-2:]
    power = torch.fft.fft2(x).abs().square().mean(tuple(range(x.ndim - 2))) / (h * w)
    radius = torch.hypot(torch.fft.fftfreq(h, dtype=torch.float64)[:, None],
                         torch.fft.fftfreq(w, dtype=torch.float64)[None, :])
    band = torch.ceil(radius * 2 * bands).long() - 1  # (0, 1/2] -> 0 .. bands-1; the mean -> -1
    counts = torch.bincount(band[(band >= 0) & (band < bands)], minlength=bands)
    if (counts == 0).any():
        raise ValueError(f"{h}x{w} images are too small for {bands} frequency bands")
    sel = (band >= 0) & (band < bands)
    return torch.bincount(band[sel], weights=power[sel], minlength=bands) / counts


def spectrum_error(x: torch.Tensor, ref: torch.Tensor, bands: int = 8) -> torch.Tensor:
    """Per band, ``log10`` of the mean power of ``x`` over that of ``ref`` (:func:`radial_spectrum`):
    white noise raises the high bands, blur lowers them; 0 for identical sets."""
    return (radial_spectrum(x, bands) / radial_spectrum(ref, bands)).log10()


def _scores(x: torch.Tensor, ref: dict[str, Any], seed: int) -> dict[str, float]:
    """The metrics of patches ``x`` against the held-out side ``ref`` (features ``fh``, spectrum ``ph``, and
    ``sub``, as many held-out patches as ``x`` for the sliced W2)."""
    err = (radial_spectrum(x) / ref["ph"]).log10()
    k = ref["sub"].shape[0]
    return {"patch_fd": frechet_distance(patch_features(x)[0], ref["fh"]),
            "spectrum": float(err.square().mean().sqrt()), "spectrum_high": float(err[-1]),
            "pixel_sw2": sliced_w2(x[:k], ref["sub"], seed=seed), "spectrum_bands": err.tolist()}


def patch_metrics(samples: torch.Tensor, spec: Any, *, seed: int = 0, floor_draws: int = 5) -> dict[str, Any]:
    """The patch metrics (module doc) of ``samples`` against the held-out patches of ``spec`` (a
    :class:`~steindiff.models.registry.ModelSpec` of a patches model, or its ``info`` dict), each with its
    ``*_floor``: the same metric of as many real training patches as samples (at most all of them) against the
    same held-out patches, averaged over ``floor_draws`` draws made with ``seed``.  The held-out side and the
    floors do not depend on the samples: they are cached in ``info``.  ``spectrum_bands``: the per-band log10
    errors of the samples (:func:`spectrum_error`)."""
    info = _reference(spec)
    x = _check(samples, "samples").clamp(-1, 1)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"patch metrics need at least 2 samples, got {n}")
    key = f"_patch_metrics/{n}/{seed}/{floor_draws}"
    if key not in info:
        held, train = _check(info["heldout"], "held-out"), _check(info["train"], "train")
        g = torch.Generator().manual_seed(seed)
        sub = held[torch.randperm(held.shape[0], generator=g)[: min(n, held.shape[0])]]
        ref = {"fh": patch_features(held)[0], "ph": radial_spectrum(held), "sub": sub}
        n_floor = min(n, train.shape[0])
        draws = 1 if n_floor == train.shape[0] else floor_draws
        scores = [_scores(train[torch.randperm(train.shape[0], generator=g)[:n_floor]], ref, seed)
                  for _ in range(draws)]
        floors = {f"{k}_floor": float(np.mean([s[k] for s in scores])) for k in PATCH_METRICS}
        info[key] = ref, {**floors, "n": n, "n_floor": n_floor, "n_heldout": held.shape[0]}
    ref, floors = info[key]
    out = {**_scores(x, ref, seed), **floors}
    return {k: out[k] for k in [m for k in PATCH_METRICS for m in (k, f"{k}_floor")]
            + ["spectrum_bands", "n", "n_floor", "n_heldout"]}
