"""Models: denoisers and adapters (VE convention ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``,
:mod:`.denoisers`), the exact-score mixtures (:mod:`.gmm`), the U-Net (:mod:`.unet`), checkpoint folders
(:mod:`.checkpoint`), trained models by name (:mod:`.trained`) and the name registry (:mod:`.registry`)."""

from . import trained as _trained  # noqa: F401  (registers "digits" and checkpoint folders)
from .denoisers import FLOW_PREDICTION_TYPES, PREDICTION_TYPES, Denoiser, EDMPrecond, FlowDenoiser, VPDenoiser
from .gmm import GMM_PRESETS, GaussianMixture, get_gmm
from .unet import UNet, UNetConfig

__all__ = ["Denoiser", "EDMPrecond", "VPDenoiser", "FlowDenoiser", "PREDICTION_TYPES", "FLOW_PREDICTION_TYPES",
           "GaussianMixture", "GMM_PRESETS", "get_gmm",
           "UNet", "UNetConfig"]
