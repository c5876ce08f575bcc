"""Stabilizers wrap any solver's step operator ``T`` and rescale its step by ``gamma_k``.

The contract is :class:`Stabilizer`: ``step(op, x) -> (x_next, step, record)``; what a stabilizer needs
from outside (a reduction across processes, a probe source) it is given when built.  :mod:`.base`: the
per-step ``gamma`` machinery (:class:`GammaStabilizer`); :mod:`.stein`: the paper's estimator, its
oracle and look-ahead forms; :mod:`.marginal`: energy matching; :mod:`.schedule`: fixed (calibrated)
gammas and their files; :mod:`.divergence`: Hutchinson and exact divergences; :mod:`.registry`: names.
"""

from .base import GammaStabilizer, NotDifferentiableError, Stabilizer, StepStats
from .registry import STABILIZERS, make_stabilizer
from .stein import SteinStabilizer

__all__ = ["Stabilizer", "GammaStabilizer", "StepStats", "SteinStabilizer", "NotDifferentiableError", "STABILIZERS",
           "make_stabilizer"]
