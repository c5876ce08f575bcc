"""Image metrics for models of the 8x8 digits (benchmark protocol, "Metrics", image models).

All feature metrics use the penultimate layer (64 features) of the project's own small digits
classifier, shipped in ``steindiff/weights/digits_classifier``: they are ``digits-FID`` and
``digits-KID``, comparable only with each other, never with Inception FID/KID.

- ``digits_fid``: Fréchet distance between Gaussians fitted to the features (Heusel et al. 2017).
- ``digits_kid``: unbiased squared MMD with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3`` (Binkowski et al. 2018), averaged over random subsets.
- ``class_tv``: total variation between the histogram of classifier labels of the samples and the
  histogram of true labels of the held-out images.
- ``precision`` / ``recall``: k-NN manifold estimates of Kynkäänniemi et al. 2019 with k = 3.
- ``memorization``: fraction of samples whose nearest training image is closer than
  ``MEMORIZATION_THRESHOLD`` = 0.1 in RMS distance per pixel (images in [-1, 1]).  For the digits,
  no held-out image is that close to a training image (the smallest held-out-to-train distance is
  about 0.12, the median 0.26), while a copy with a little noise is far below it.

:func:`image_metrics` compares samples with the held-out images (never seen in training) and
reports each metric with its floor: the same metric for real training images of the same count as
the samples (at most all of them) against the same held-out images.  A model that reproduced the
training distribution exactly would score the floor, up to sampling noise.

Standard Inception FID/KID (:func:`inception_fid`) needs ``torchmetrics`` with ``torch-fidelity``
and a local file of FID Inception weights: nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["DigitsClassifier", "load_digits_classifier", "load_classifier", "digits_features", "classifier_features",
           "frechet_distance", "kid", "precision_recall", "memorization_rate", "class_tv", "image_metrics",
           "inception_fid", "MEMORIZATION_THRESHOLD", "CLASSIFIER_DIR"]

MEMORIZATION_THRESHOLD = 0.1
CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "weights" / "digits_classifier"
CLASSIFIER_SCHEMA = "steindiff.digits_classifier/1"


class DigitsClassifier(nn.Module):
    """Small CNN on ``(B, 1, 8, 8)`` images in [-1, 1]; ``features`` gives the 64-d penultimate layer
    (after its ReLU) divided by ``feature_scale``, the RMS feature value on the training images, so that
    ``x.y / d`` is of order one as the KID kernel assumes."""

    def __init__(self, width: int = 32, n_features: int = 64, n_classes: int = 10, feature_scale: float = 1.0):
        super().__init__()
        self.feature_scale = float(feature_scale)
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 4, n_features), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(n_features, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"the digits classifier needs (N, 1, 8, 8) images, got {tuple(x.shape)}")
        return self.body(x) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x) * self.feature_scale))


@functools.lru_cache(maxsize=8)
def load_classifier(path: str, cls: type[nn.Module] = DigitsClassifier, schema: str = CLASSIFIER_SCHEMA) -> nn.Module:
    """A feature classifier ``cls`` saved in ``path`` (``model.safetensors`` and a ``config.json`` with
    ``schema`` and the architecture), in eval mode and frozen; cached per path."""
    from safetensors.torch import load_file

    p = Path(path)
    cfile, wfile = p / "config.json", p / "model.safetensors"
    try:
        config = json.loads(cfile.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{cfile}: missing or unreadable classifier config ({e})") from None
    if config.get("schema") != schema:
        raise ValueError(f"{cfile}: not a {cls.__name__} config (schema {schema!r} expected)")
    model = cls(**config["architecture"])
    try:
        state = load_file(str(wfile))
    except Exception as e:
        raise ValueError(f"{wfile}: missing or corrupt classifier weights ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{wfile}: weights do not match {cfile.name}: {str(e).splitlines()[0]}") from None
    model.eval().requires_grad_(False)
    model.config = config
    return model


def load_digits_classifier(path: str | os.PathLike | None = None) -> DigitsClassifier:
    """The shipped digits classifier (eval mode, frozen), or one saved in the same format
    (``model.safetensors`` and a ``config.json`` naming its architecture)."""
    return load_classifier(str(Path(path) if path is not None else CLASSIFIER_DIR))  # type: ignore[return-value]


def _check_images(x: torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if x.ndim == 2 and x.shape[1] == 64:
        x = x.reshape(-1, 1, 8, 8)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"{what}: digits metrics need (N, 1, 8, 8) images, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: images contain NaN or Inf")
    return x


@torch.no_grad()
def digits_features(x: torch.Tensor, classifier: DigitsClassifier | None = None,
                    batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, 64) float64, predicted labels (N,))`` of images clamped to [-1, 1]."""
    return classifier_features(classifier or load_digits_classifier(), _check_images(x, "images"), batch_size)


@torch.no_grad()
def classifier_features(clf: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, d) float64, predicted labels (N,))`` of images clamped to [-1, 1], by a classifier with
    ``features``, ``head`` and ``feature_scale`` (:class:`DigitsClassifier`, the patch classifier)."""
    x = x.clamp(-1, 1)
    feats, labels = [], []
    for i in range(0, x.shape[0], batch_size):
        f = clf.features(x[i : i + batch_size])
        feats.append(f.to(torch.float64))
        labels.append(clf.head(f * clf.feature_scale).argmax(1))
    return torch.cat(feats), torch.cat(labels)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(f1: torch.Tensor | np.ndarray, f2: torch.Tensor | np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` of two feature sets (rows = samples)."""
    a, b = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, d) with the same d, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("Fréchet distance needs at least 2 samples per set")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r1 = _psd_sqrt(s1)
    cross = _psd_sqrt(r1 @ s2 @ r1)
    return float(max(0.0, ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross)))


def kid(f1: torch.Tensor, f2: torch.Tensor, *, n_subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel Inception-style distance on the given features: unbiased MMD^2 with the kernel
    ``(x.y / d + 1)^3``, averaged over ``n_subsets`` random subsets of ``min(subset_size, n1, n2)``
    (one pass over the full sets when they are no larger than that)."""
    a, b = torch.as_tensor(f1, dtype=torch.float64), torch.as_tensor(f2, dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, d) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    d = a.shape[1]
    g = torch.Generator().manual_seed(seed)
    full = a.shape[0] == m and b.shape[0] == m
    vals = []
    for _ in range(1 if full else n_subsets):
        x = a if a.shape[0] == m else a[torch.randperm(a.shape[0], generator=g)[:m]]
        y = b if b.shape[0] == m else b[torch.randperm(b.shape[0], generator=g)[:m]]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        vals.append(float((kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean()))
    return float(np.mean(vals))


def _kth_nn_radii(f: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(f, f)
    return d.kthvalue(k + 1, dim=1).values  # k+1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the fraction of
    ``fake`` inside the union of balls around ``real`` points with radius the distance to their
    k-th nearest real neighbour; recall swaps the roles.  Both sets need more than ``k`` points."""
    r, f = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    if r.shape[0] <= k or f.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got "
                         f"{r.shape[0]} and {f.shape[0]}")
    rr, rf = _kth_nn_radii(r, k), _kth_nn_radii(f, k)
    d = torch.cdist(f, r)  # (n_fake, n_real)
    precision = (d <= rr[None, :]).any(1).double().mean()
    recall = (d <= rf[:, None]).any(0).double().mean()
    return float(precision), float(recall)


def nearest_distance(x: torch.Tensor, train: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """RMS distance per pixel from each image of ``x`` to its nearest image in ``train``."""
    a, b = x.reshape(x.shape[0], -1).to(torch.float64), train.reshape(train.shape[0], -1).to(torch.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"images of {a.shape[1]} and {b.shape[1]} values cannot be compared")
    out = [torch.cdist(a[i : i + batch_size], b).min(1).values for i in range(0, a.shape[0], batch_size)]
    return torch.cat(out) / a.shape[1] ** 0.5


def memorization_rate(x: torch.Tensor, train: torch.Tensor, threshold: float = MEMORIZATION_THRESHOLD) -> float:
    """Fraction of ``x`` whose nearest ``train`` image is closer than ``threshold`` (RMS per pixel)."""
    x = torch.as_tensor(x).detach().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or Inf")
    return float((nearest_distance(x.clamp(-1, 1), train) < threshold).double().mean())


def class_tv(labels: torch.Tensor, ref_labels: torch.Tensor, n_classes: int = 10) -> float:
    """Total variation between two label histograms."""
    p = torch.bincount(torch.as_tensor(labels).long(), minlength=n_classes).double()
    q = torch.bincount(torch.as_tensor(ref_labels).long(), minlength=n_classes).double()
    return float(0.5 * (p / p.sum() - q / q.sum()).abs().sum())


def _reference(spec: Any) -> dict[str, torch.Tensor]:
    info = getattr(spec, "info", spec)
    missing = [k for k in ("heldout", "heldout_labels", "train") if info.get(k) is None]
    if missing:
        raise ValueError(f"model {getattr(spec, 'name', '?')!r} carries no reference images "
                         f"({', '.join(missing)} missing in its info); "
                         "image metrics need a digits model whose held-out split is known")
    return info


def image_metrics(samples: torch.Tensor, spec: Any, *, k: int = 3, seed: int = 0, floor_draws: int = 5,
                  memorization_threshold: float = MEMORIZATION_THRESHOLD) -> dict[str, float]:
    """All digits image metrics of ``samples`` against the held-out images of ``spec`` (a
    :class:`~steindiff.models.registry.ModelSpec` of a digits model, or its ``info`` dict), each with
    its ``*_floor``: the same metric of real training images, as many as the samples (at most all
    of them), against the same held-out images, averaged over ``floor_draws`` random draws made
    with ``seed``.  ``memorization_floor`` is the rate of the held-out images themselves."""
    ref = _reference(spec)
    x = _check_images(samples, "samples")
    held, train = _check_images(ref["heldout"], "held-out"), _check_images(ref["train"], "train")
    held_y = ref["heldout_labels"]
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"image metrics need more than {k} samples, got {n}")
    n_floor = min(n, train.shape[0])
    f_h, _ = digits_features(held)
    f_tr, y_tr = digits_features(train)

    def scores(f: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        p, r = precision_recall(f_h, f, k)
        return {"digits_fid": frechet_distance(f, f_h), "digits_kid": kid(f, f_h, seed=seed),
                "class_tv": class_tv(y, held_y), "precision": p, "recall": r}

    out = {**scores(*digits_features(x)), "memorization": memorization_rate(x, train, memorization_threshold)}
    g = torch.Generator().manual_seed(seed)
    fl = []  # the floors' draws (one when all training images are used)
    for _ in range(1 if n_floor == train.shape[0] else floor_draws):
        idx = torch.randperm(train.shape[0], generator=g)[:n_floor]
        fl.append(scores(f_tr[idx], y_tr[idx]))
    out.update({f"{k_}_floor": float(np.mean([s[k_] for s in fl])) for k_ in fl[0]})
    out.update(memorization_floor=memorization_rate(held, train, memorization_threshold), n=n, n_floor=n_floor,
               n_heldout=held.shape[0], memorization_threshold=memorization_threshold)
    order = ["digits_fid", "digits_kid", "class_tv", "precision", "recall", "memorization"]
    keys = [m for k_ in order for m in (k_, f"{k_}_floor")] + ["n", "n_floor", "n_heldout", "memorization_threshold"]
    return {m: out[m] for m in keys}


def inception_fid(samples: torch.Tensor, reference: torch.Tensor, weights: str | os.PathLike | None, *,
                  kid_subset_size: int = 100) -> dict[str, float]:
    """Standard Inception FID and KID with ``torchmetrics`` (+ ``torch-fidelity``), using a local
    file of FID Inception weights (``pt_inception-2015-12-05`` state dict).  Nothing is downloaded:
    without the packages or the weights file this raises an error saying what is missing.

    Images are ``(N, C, H, W)`` in [-1, 1]; grayscale is repeated to RGB and the images resized by
    the feature extractor to 299x299.  On 8x8 digits these numbers are of little meaning."""
    if weights is None:
        raise FileNotFoundError("Inception FID needs local FID Inception weights: pass the path of the "
                                "pt_inception-2015-12-05 weights file (nothing is downloaded)")
    wpath = Path(weights)
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath}: Inception weights file not found")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError:
        raise ImportError("Inception FID needs the optional packages torchmetrics and torch-fidelity "
                          "(pip install torchmetrics torch-fidelity)") from None

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).detach().float().clamp(-1, 1)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return ((x + 1) * 127.5).round().to(torch.uint8)

    s, r = prep(samples), prep(reference)
    try:
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(wpath))
        kidm = KernelInceptionDistance(feature=2048, subset_size=min(kid_subset_size, s.shape[0], r.shape[0]),
                                       feature_extractor_weights_path=str(wpath))
    except TypeError:
        raise ImportError("this torchmetrics version cannot load local Inception weights "
                          "(feature_extractor_weights_path); upgrade torchmetrics") from None
    for m in (fid, kidm):
        m.update(r, real=True)
        m.update(s, real=False)
    kmean, kstd = kidm.compute()
    return {"inception_fid": float(fid.compute()), "inception_kid": float(kmean), "inception_kid_std": float(kstd)}
