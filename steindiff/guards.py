"""Data-free checks of a calibration candidate: are its samples as clean as the fine solve's?

A calibrated plan is chosen among candidates by its distance to the fine solve of the same model
(:mod:`steindiff.trajectory`).  A distance can be lowered by samples that keep a little noise, or lose
some detail, which a user's model has no likelihood to reveal.  Each check here compares a candidate's
validation samples with the fine solve's samples from the same noise (the *reference*) and with the
plain solver's, using nothing but the model:

- ``residual``: how far one more denoising pass at the smallest noise level moves the samples, RMS per
  coordinate of ``D(x, sigma_min) - x`` over the batch (:func:`denoise_residuals`).  Residual noise is
  removed by that pass (the samples move more than the reference's); over-smoothed samples move less.
- ``residual_tail``: the same per sample, its 90th percentile: a few noisy samples in a clean batch.
- ``denoised``: the samples after that pass, as a set, against the reference's after it (sliced
  Wasserstein-2): the distribution check once the faint noise is taken away.
- ``modes``: how the samples share out among the reference's clusters (k-means with ``k = 8`` on the
  reference's samples, :func:`mode_histogram`): total variation between the candidate's histogram and the
  reference's.  Steps that move mass between modes change it; the other checks barely see that.
- ``spectrum``: the power in the highest band of spatial frequencies (images only: samples of shape
  ``(C, H, W)``), ``log10`` of its ratio to the reference's (:func:`~steindiff.metrics.patches.radial_spectrum`):
  above 0 residual noise, below 0 blur (Durall et al. 2020; Dzanic et al. 2020).
- ``elbo``: the model's own likelihood bound of the samples, the continuous-time diffusion loss
  (Kingma et al. 2021, "Variational Diffusion Models", Eq. 17 in terms of ``SNR = 1/sigma^2``)

      L(x) = 1/2 int ||x - D(x + sigma eps, sigma)||^2 dSNR = int ||x - D(x + sigma eps, sigma)||^2 / sigma^2 dlog sigma

  per coordinate, between ``sigma_min`` and ``sigma_max`` (:func:`diffusion_loss`).  Up to the prior and
  reconstruction terms it bounds the negative log-likelihood that the model assigns to ``x``; with an
  exact denoiser it is the data's NLL (Song et al. 2021, "Maximum Likelihood Training of Score-Based
  Diffusion Models").  It costs ``levels`` model passes per candidate.

Every check compares a candidate with the plain solver (:func:`judge`): it passes when its statistic is no
farther from the reference's than the plain solver's is, up to a relative margin (:data:`MARGINS`) or an
absolute tolerance (:data:`TOLERANCES`).  The plain solver passes every check.  A check that does not apply
(``spectrum`` on samples that are not images) passes and records ``None``.  Which checks a calibration
applies by default, and why, is in ``docs/guards.md`` (:func:`steindiff.calibration.default_guards`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .metrics import sliced_w2
from .metrics.patches import radial_spectrum

__all__ = ["CHECKS", "CHEAP_CHECKS", "TOLERANCES", "MARGINS", "MODES", "SampleStats", "denoise_residuals",
           "diffusion_loss", "kmeans", "mode_histogram", "sample_stats", "statistics", "judge"]

#: Every check, in the order they are recorded.
CHECKS = ("residual", "residual_tail", "denoised", "modes", "spectrum", "elbo")
#: The checks that need no more than the one denoising pass at ``sigma_min`` (always recorded).
CHEAP_CHECKS = ("residual", "residual_tail", "denoised", "modes", "spectrum")
#: Default tolerance of each check, in the unit of its deviation from the reference (:func:`statistics`):
#: relative for ``residual`` and ``residual_tail`` (5%), absolute for ``spectrum`` (log10 of a power ratio:
#: 0.05 is 12%) and ``elbo`` (nats per coordinate), relative to the plain solver's distance for ``denoised``,
#: and for ``modes`` an absolute total variation above the plain solver's.
TOLERANCES = {"residual": 0.05, "residual_tail": 0.05, "denoised": 0.0, "modes": 0.05, "spectrum": 0.05,
              "elbo": 0.05}
#: Relative margin of each two-sided check over the plain solver's deviation (:func:`judge`).
#: ``residual`` and ``elbo``: 0.2, chosen by ``benchmarks/guards_study.py`` (docs/guards.md): the margin with the most
#: cells better than plain on the primary metric among those whose kept candidates are hidden trades in at most
#: 5% of the study's cells.  On the digits U-Net the candidates with the lower digits-FID often move more under one
#: more denoising pass than the plain solver's samples do; larger margins keep more of them, and more trades.
MARGINS = {"residual": 0.2, "residual_tail": 0.0, "spectrum": 0.0, "elbo": 0.2}
#: Clusters of the ``modes`` check.
MODES = 8


@dataclass
class SampleStats:
    """What the checks need of one set of samples: ``residual`` per sample (RMS per coordinate of
    ``D(x, sigma_min) - x``), the ``denoised`` samples, the ``samples`` themselves, the radial power
    ``spectrum`` (images; else ``None``) and the per-sample diffusion loss ``elbo`` (when asked for; else
    ``None``).  ``centroids``: the ``modes`` check's clusters, when these are a reference's (made on first use)."""

    residual: torch.Tensor
    denoised: torch.Tensor
    samples: torch.Tensor
    spectrum: torch.Tensor | None = None
    elbo: torch.Tensor | None = None
    centroids: torch.Tensor | None = None


def _sigma(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)


@torch.no_grad()
def denoise_residuals(model: Callable[..., torch.Tensor], x: torch.Tensor, sigma: float,
                      extra_args: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, d)``: ``d = D(x, sigma)`` and, per sample, ``r = RMS per coordinate of d - x`` (float64)."""
    d = model(x, _sigma(x, sigma), **(extra_args or {}))
    return (d - x).double().reshape(len(x), -1).pow(2).mean(1).sqrt(), d


@torch.no_grad()
def diffusion_loss(model: Callable[..., torch.Tensor], x: torch.Tensor, sigma_min: float, sigma_max: float, *,
                   levels: int = 16, seed: int = 0, extra_args: dict | None = None) -> torch.Tensor:
    """Per sample, the diffusion loss ``int ||x - D(x + sigma eps, sigma)||^2 / sigma^2 dlog sigma`` per
    coordinate over ``[sigma_min, sigma_max]`` (module docstring): the midpoint rule on ``levels`` intervals
    of equal width in ``log sigma``, one ``eps`` per sample and level drawn from ``seed`` on the CPU, so that
    sets of the same shape see the same noise (their difference has less variance).  ``levels`` model passes."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    width = (hi - lo) / levels
    total = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    for k in range(levels):
        sigma = math.exp(lo + (k + 0.5) * width)
        eps = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)
        d = model(x + sigma * eps, _sigma(x, sigma), **(extra_args or {}))
        total += (x - d).double().reshape(len(x), -1).pow(2).mean(1) / sigma**2 * width
    return total


def kmeans(x: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """``k`` centroids of the rows of ``x`` (Lloyd's algorithm from ``k`` rows drawn with ``seed``; a cluster
    that empties keeps its centroid): deterministic for given samples."""
    x = x.reshape(len(x), -1).double()
    k = min(k, len(x))
    c = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k].to(x.device)].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        new = c.clone()
        for j in range(k):
            if (a == j).any():
                new[j] = x[a == j].mean(0)
        if torch.equal(new, c):
            break
        c = new
    return c


def mode_histogram(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The fraction of the samples ``x`` nearest to each centroid."""
    a = torch.cdist(x.reshape(len(x), -1).double(), centroids).argmin(1)
    return torch.bincount(a, minlength=len(centroids)).double() / len(x)


def _is_image(x: torch.Tensor) -> bool:
    return x.ndim == 4 and min(x.shape[-2:]) >= 8


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    """Radial power spectrum with up to 8 bands, fewer on small images (at least 4 pixels per band)."""
    return radial_spectrum(x.detach().cpu(), bands=max(2, min(8, min(x.shape[-2:]) // 4)))


def sample_stats(model: Callable[..., torch.Tensor], x: torch.Tensor, sigma_min: float, *,
                 checks: Sequence[str] = CHEAP_CHECKS, sigma_max: float | None = None, elbo_levels: int = 16,
                 seed: int = 0, extra_args: dict | None = None) -> SampleStats:
    """The statistics of the samples ``x`` that ``checks`` need: one denoising pass at ``sigma_min``, the
    spectrum of images, and with ``"elbo"`` among ``checks`` the diffusion loss up to ``sigma_max``
    (:func:`diffusion_loss`, ``elbo_levels`` passes, noise from ``seed``)."""
    r, d = denoise_residuals(model, x, sigma_min, extra_args)
    stats = SampleStats(r, d, x.detach(), _spectrum(x) if _is_image(x) else None)
    if "elbo" in checks:
        if sigma_max is None:
            raise ValueError("the elbo check needs sigma_max")
        stats.elbo = diffusion_loss(model, x, sigma_min, sigma_max, levels=elbo_levels, seed=seed,
                                    extra_args=extra_args)
    return stats


def statistics(stats: SampleStats, ref: SampleStats) -> dict[str, float | None]:
    """Each check's deviation from the reference (0: as the reference; the sign says which way):
    ``residual`` and ``residual_tail`` as ratios minus 1 (the mean-square RMS over the batch, and the 90th
    percentile of the per-sample values), ``denoised`` the sliced Wasserstein-2 distance of the denoised
    sets (never negative), ``modes`` the total variation between the histograms over the reference's
    clusters (:func:`kmeans`, :data:`MODES` clusters; never negative), ``spectrum`` the ``log10`` power ratio in
    the highest band, ``elbo`` the difference of the mean diffusion losses (nats per coordinate); with the values
    themselves (``*_value``)."""

    def ratio(a: float, b: float) -> float:
        return a / b - 1.0 if b > 0 else 0.0

    rms = float(stats.residual.pow(2).mean().sqrt())
    q90 = float(torch.quantile(stats.residual, 0.9))
    out: dict[str, float | None] = {
        "residual": ratio(rms, float(ref.residual.pow(2).mean().sqrt())), "residual_value": rms,
        "residual_tail": ratio(q90, float(torch.quantile(ref.residual, 0.9))), "residual_tail_value": q90,
        "denoised": sliced_w2(stats.denoised, ref.denoised),
        "spectrum": None, "elbo": None}
    if ref.centroids is None:
        ref.centroids = kmeans(ref.samples, MODES)
    out["modes"] = float(0.5 * (mode_histogram(stats.samples, ref.centroids)
                                - mode_histogram(ref.samples, ref.centroids)).abs().sum())
    if stats.spectrum is not None and ref.spectrum is not None:
        out["spectrum"] = float((stats.spectrum[-1] / ref.spectrum[-1]).log10())
    if stats.elbo is not None and ref.elbo is not None:
        out["elbo"] = float(stats.elbo.mean() - ref.elbo.mean())
        out["elbo_value"] = float(stats.elbo.mean())
    return out


def judge(check: str, candidate: float | None, plain: float | None, tolerance: float | None = None,
          margin: float | None = None) -> bool:
    """Does a candidate pass ``check``: is its deviation from the reference (:func:`statistics`) no larger
    in size than the plain solver's times ``1 + margin`` (default :data:`MARGINS`), or than the check's
    ``tolerance`` (default :data:`TOLERANCES`)?  For the distances ``denoised`` and ``modes``: no larger than
    the plain solver's, up to the tolerance (relative, absolute).  A check that does not apply (``None`` for
    both) passes; a candidate without a value where the plain solver has one (non-finite samples) fails."""
    if check not in CHECKS:
        raise ValueError(f"unknown check {check!r}; choose from {', '.join(CHECKS)}")
    tol = TOLERANCES[check] if tolerance is None else tolerance
    if plain is None:
        return True
    if candidate is None or not math.isfinite(candidate):
        return False
    if check == "denoised":  # a distance: no farther than plain's, by the relative tolerance
        return candidate <= plain * (1.0 + tol)
    if check == "modes":  # a distance: no farther than plain's, by the absolute tolerance
        return candidate <= plain + tol
    m = MARGINS.get(check, 0.0) if margin is None else margin
    return abs(candidate) <= max(abs(plain) * (1.0 + m), tol)
