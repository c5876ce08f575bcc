"""Stabilizers wrap any solver's step operator ``T`` and rescale its step by ``gamma_k``."""

from .base import GammaStabilizer, NotDifferentiableError, StepStats, coordinate_scales
from .registry import STABILIZERS, make_stabilizer
from .stein import SteinStabilizer

__all__ = ["GammaStabilizer", "StepStats", "SteinStabilizer", "NotDifferentiableError", "coordinate_scales",
           "STABILIZERS", "make_stabilizer"]
