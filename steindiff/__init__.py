"""steindiff: fast, stable few-step diffusion sampling, with the Stein stabilization of SteinDiff.

The package is built in layers, lowest first; a module imports only from its own layer or lower ones,
and the imports have no cycle, imports inside functions included (``tests/test_layers.py`` checks both):

0. foundations: file output (``io``), devices, figures (``plotting``), model fingerprints (``fingerprint``),
   noise processes (``noise``: alpha, sigma, log-SNR, VP <-> VE);
1. noise-level schedules, solvers (one step operator each), image datasets (``data``), metrics of
   samples, feature maps for the gradient fit's distance (``distances``);
2. models: denoisers and adapters, exact mixtures, the U-Net, checkpoints, named models;
3. stabilizers: the :class:`~steindiff.stabilizers.Stabilizer` contract and its implementations;
4. the sampling plan (``plan``: a budget to noise levels) and the sampling loop (``sampling``);
5. what runs the loop: generation from a named model, the trajectory calibration (derivative-free and
   gradient fits) and the estimate of its duration (``fit_estimate``), the peers' fits (``peers``: GITS,
   whose levels the gradient fit starts from, and LD3), diagnostics;
6. calibration files and the calibrated sampler (``calibration``), multi-process sampling, training;
7. the public ``sample`` (``api``), the benchmark, the diffusers and k-diffusion integrations;
8. the command line.
"""

from ._version import __version__
from .api import sample
from .calibration import calibrate, calibrated_plan
from .noise import ContinuousVPProcess, DiscreteVPProcess, FlowProcess, NoiseProcess, VEProcess
from .plan import SamplingPlan, make_plan
from .sampling import SampleResult, prior_noise
from .schedules import get_sigmas, karras_sigmas, logsnr_sigmas, time_sigmas, validate_sigmas
from .solvers import SOLVERS, get_solver

__all__ = [
    "NoiseProcess", "VEProcess", "DiscreteVPProcess", "ContinuousVPProcess", "FlowProcess",
    "sample", "SampleResult", "prior_noise", "SamplingPlan", "make_plan", "calibrate", "calibrated_plan",
    "get_sigmas", "karras_sigmas", "logsnr_sigmas", "time_sigmas", "validate_sigmas",
    "SOLVERS", "get_solver", "__version__",
]
