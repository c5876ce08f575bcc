"""Denoisers and model adapters (VE convention ``D(x, sigma)``) and the exact-score mixtures."""

from .denoisers import PREDICTION_TYPES, Denoiser, EDMPrecond, VPDenoiser

__all__ = ["Denoiser", "EDMPrecond", "VPDenoiser", "PREDICTION_TYPES"]

from .gmm import GMM_PRESETS, GaussianMixture, get_gmm  # noqa: E402

__all__ += ["GaussianMixture", "GMM_PRESETS", "get_gmm"]

from . import trained as _trained  # noqa: E402,F401  (registers "digits" and checkpoint folders)
from .unet import UNet, UNetConfig  # noqa: E402

__all__ += ["UNet", "UNetConfig"]
