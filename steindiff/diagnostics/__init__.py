"""Diagnostics of samplers: local Lipschitz constants of step operators (the contractivity trap), and
the ``rho`` record of a stabilized step.  Measured beside the methods, never inside them."""

from .contractivity import diagnose, plot_diagnosis, summarize
from .lipschitz import denoiser_lipschitz, local_lipschitz, step_lipschitz
from .rho import RhoRecorder

__all__ = ["local_lipschitz", "step_lipschitz", "denoiser_lipschitz", "diagnose", "plot_diagnosis", "summarize",
           "RhoRecorder"]
