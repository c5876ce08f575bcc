"""Metrics: mixture metrics against exact distributions, and image metrics."""

from .mixture import mixture_metrics, mmd_rbf, mode_tv, nll_per_dim, sliced_w2, traj_err

__all__ = ["mixture_metrics", "mmd_rbf", "mode_tv", "nll_per_dim", "sliced_w2", "traj_err"]
