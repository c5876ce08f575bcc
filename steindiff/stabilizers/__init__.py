"""Stabilizers wrap any solver's step operator ``T`` and rescale its step (see :mod:`.stein`)."""

from .stein import NotDifferentiableError, SteinStabilizer, coordinate_scales

__all__ = ["SteinStabilizer", "NotDifferentiableError", "coordinate_scales"]
from .registry import STABILIZERS, make_stabilizer  # noqa: E402

__all__ += ["STABILIZERS", "make_stabilizer"]
