"""Learned-schedule peers of the calibrated sampler, implemented here from their papers (no code copied),
so that they run on the same models, from the same teacher and the same noise as the calibrated sampler:

- :func:`~steindiff.peers.gits.gits_plan`: GITS, the time steps chosen by dynamic programming over a cost
  matrix measured on teacher trajectories (Chen et al. 2024, arXiv 2405.11326).

Each returns a :class:`~steindiff.plan.SamplingPlan` for the library's own solvers;
:mod:`steindiff.bench.peers` runs them as benchmark rows.
"""

from .gits import cheapest_path, gits_cost_matrix, gits_plan, path_cost

__all__ = ["gits_plan", "gits_cost_matrix", "cheapest_path", "path_cost"]
