"""Learned-schedule peers of the calibrated sampler, implemented here from their papers (no code copied),
so that they run on the same models, from the same teacher and the same noise as the calibrated sampler:

- :func:`~steindiff.peers.gits.gits_plan`: GITS, the time steps chosen by dynamic programming over a cost
  matrix measured on teacher trajectories (Chen et al. 2024, arXiv 2405.11326);
- :func:`~steindiff.peers.ld3.ld3_plan`: LD3, the time steps and the model's input times learned by
  backpropagation through the few-step solve, with soft teacher forcing (Tong et al. 2025, arXiv 2405.15506).

Each returns a :class:`~steindiff.plan.SamplingPlan` for the library's own solvers;
:mod:`steindiff.bench.peers` runs them as benchmark rows.
"""

from .gits import cheapest_path, gits_cost_matrix, gits_plan, path_cost
from .ld3 import ld3_plan

__all__ = ["gits_plan", "gits_cost_matrix", "cheapest_path", "path_cost", "ld3_plan"]
