"""steindiff: fast, stable few-step diffusion sampling, with the Stein stabilization of SteinDiff."""

from .noise import ContinuousVPProcess, DiscreteVPProcess, NoiseProcess, VEProcess
from .sampling import SampleResult, prior_noise
from .plan import SamplingPlan, make_plan
from .api import sample
from .calibrate import calibrated_plan
from .schedules import get_sigmas, karras_sigmas, logsnr_sigmas, time_sigmas, validate_sigmas
from .solvers import SOLVERS, get_solver

__version__ = "0.1.0"

__all__ = [
    "NoiseProcess", "VEProcess", "DiscreteVPProcess", "ContinuousVPProcess",
    "sample", "SampleResult", "prior_noise", "SamplingPlan", "make_plan", "calibrated_plan",
    "get_sigmas", "karras_sigmas", "logsnr_sigmas", "time_sigmas", "validate_sigmas",
    "SOLVERS", "get_solver",
]
