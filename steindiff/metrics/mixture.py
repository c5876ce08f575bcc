"""Sample-quality metrics against a known distribution (benchmark protocol, "Metrics")."""

from __future__ import annotations

import torch

__all__ = ["sliced_w2", "mmd_rbf", "mode_tv", "nll_per_dim", "traj_err", "mixture_metrics"]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _directions(dim: int, n_dirs: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Fixed random unit directions: drawn on the CPU (the same on any device), then moved."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, n_dirs, generator=g, dtype=torch.float64)
    return (v / v.norm(dim=0, keepdim=True)).to(device)


def _on(x: torch.Tensor, gmm) -> torch.Tensor:
    """Samples flattened to float64 on the mixture's device (metrics follow the mixture)."""
    return _flat(x).to(gmm.device)


def sliced_w2(x: torch.Tensor, y: torch.Tensor, n_dirs: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 between two equal-size sample sets over ``n_dirs`` fixed random
    directions: ``sqrt(mean_dirs mean_i (sort(x v)_i - sort(y v)_i)^2)``.  Computed on ``x``'s device."""
    x = _flat(x)
    y = _flat(y).to(x.device)
    if x.shape != y.shape:
        raise ValueError(f"sliced_w2 needs equal-size sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    v = _directions(x.shape[1], n_dirs, seed, x.device)
    px, _ = torch.sort(x @ v, dim=0)
    py, _ = torch.sort(y @ v, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, max_n: int = 2000) -> float:
    """Unbiased squared MMD with an RBF kernel, bandwidth the median pairwise distance of the pooled set."""
    x = _flat(x)[:max_n]
    y = _flat(y)[:max_n].to(x.device)
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z) ** 2
    n = x.shape[0]
    bw2 = d2[d2 > 0].median()
    k = torch.exp(-d2 / bw2)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    m = y.shape[0]
    return float((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean())


def mode_tv(x: torch.Tensor, gmm) -> float:
    """Total variation between the histogram of most-likely components and the mixture weights."""
    labels = gmm.responsibilities(_on(x, gmm), 0.0).argmax(1)
    hist = torch.bincount(labels, minlength=gmm.K).to(torch.float64) / x.shape[0]
    return float(0.5 * (hist - gmm.weights).abs().sum())


def nll_per_dim(x: torch.Tensor, gmm) -> float:
    """Mean negative log-likelihood per dimension under the true mixture."""
    return float(-gmm.log_prob(_on(x, gmm), 0.0).mean() / gmm.dim)


def traj_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS distance per dimension to a reference solution from the same initial noise."""
    x = _flat(x)
    return float(((x - _flat(ref).to(x.device)) ** 2).mean().sqrt())


def mixture_metrics(x: torch.Tensor, gmm, *, seed: int = 0, ref: torch.Tensor | None = None, mmd: bool = False) -> dict:
    """The protocol's metrics of samples ``x`` against the mixture ``gmm``: ``sw2`` with its floor
    ``sw2_floor`` (the same statistic between two independent true sets of the same size),
    ``mode_tv``, ``nll`` and, given ``ref``, ``traj_err``; optionally ``mmd`` and ``mmd_floor``.
    Computed on the mixture's device (``x`` is moved there)."""
    n = x.shape[0]
    x = _on(x, gmm)
    if not torch.isfinite(x).all():
        raise ValueError("samples contain NaN or Inf")
    true_a = gmm.sample(n, seed=10_000 + seed)
    true_b = gmm.sample(n, seed=20_000 + seed)
    out = {
        "sw2": sliced_w2(x, true_a),
        "sw2_floor": sliced_w2(true_b, true_a),
        "mode_tv": mode_tv(x, gmm),
        "nll": nll_per_dim(x, gmm),
    }
    if mmd:
        out["mmd"] = mmd_rbf(x, true_a)
        out["mmd_floor"] = mmd_rbf(true_b, true_a)
    if ref is not None:
        out["traj_err"] = traj_err(x, ref)
    return out
