"""Diagnostics of samplers: local Lipschitz constants of step operators (the contractivity trap)."""

from .contractivity import diagnose, plot_diagnosis, summarize
from .lipschitz import denoiser_lipschitz, local_lipschitz, step_lipschitz

__all__ = ["local_lipschitz", "step_lipschitz", "denoiser_lipschitz", "diagnose", "plot_diagnosis", "summarize"]
