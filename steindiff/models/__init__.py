"""Denoisers and model adapters (VE convention ``D(x, sigma)``) and the exact-score mixtures."""

from .denoisers import PREDICTION_TYPES, Denoiser, EDMPrecond, VPDenoiser

__all__ = ["Denoiser", "EDMPrecond", "VPDenoiser", "PREDICTION_TYPES"]
