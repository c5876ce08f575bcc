"""High-level generation: a named model, solver, schedule and NFE budget to samples and metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .models.registry import ModelSpec
from .plan import SamplingPlan, make_plan
from .sampling import SampleResult, prior_noise, sample
from .stabilizers import Stabilizer

__all__ = ["generate", "Generation"]


@dataclass
class Generation(SampleResult):
    """Samples of one configuration (:class:`~steindiff.sampling.SampleResult`: cost accounting and the
    per-step trace, over all batches), with the noise levels and the initial noise."""

    sigmas: torch.Tensor | None = None
    noise: torch.Tensor | None = None


def generate(spec: ModelSpec, plan: SamplingPlan | None = None, *, solver: str = "dpmpp_2m", nfe: int = 10,
             schedule: str = "karras", n: int = 1000, seed: int = 0, stabilizer: Stabilizer | None = None,
             batch_size: int | None = None, dtype: torch.dtype = torch.float32, progress: bool = False,
             solver_options: dict | None = None, rho: float = 7.0, noise: torch.Tensor | None = None,
             sigmas: torch.Tensor | None = None, callback: Callable[[dict], None] | None = None,
             device: str | torch.device | None = None) -> Generation:
    """Draw ``n`` samples from ``spec`` by ``plan`` (solver, noise levels and, calibrated, gammas).

    Without a plan, :func:`~steindiff.plan.make_plan` makes the plain one of ``solver`` within ``nfe``
    model passes per sample on ``schedule`` (``rho``, ``solver_options``; ``sigmas`` overrides the
    schedule).  A plan's gammas apply unless a ``stabilizer`` is given (then the plan may have none).

    The initial noise for all ``n`` samples comes from ``seed`` at once (drawn on the CPU, then
    moved), so a sample does not depend on ``batch_size`` unless the stabilizer uses batch statistics,
    nor on the device beyond floating-point rounding.  ``device``: where to sample; default the
    model's device (:attr:`ModelSpec.device`), else ``noise``'s, else the CPU.  Given ``noise`` is
    moved there; a model on another device is refused (move it with :meth:`ModelSpec.to`).
    """
    if plan is None:
        plan = make_plan(spec.process, solver, nfe, schedule, rho=rho, sigmas=sigmas, solver_options=solver_options)
    if stabilizer is None:
        stabilizer = plan.stabilizer()
    elif plan.stabilizer() is not None:
        raise ValueError("the plan has calibrated gammas: give either the plan or a stabilizer")
    sigmas, solver_obj = plan.sigmas, plan.get_solver()
    if device is None:
        device = spec.device or (noise.device if noise is not None else torch.device("cpu"))
    device = torch.device(device)
    if noise is None:
        noise = prior_noise((n, *spec.sample_shape), float(sigmas[0]), spec.process, seed=seed, dtype=dtype,
                            device=device)
    else:
        noise = noise.to(device)
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outs, trace, nfe_used, extra, wall = [], [], 0, 0, 0.0
    for start in range(0, n, bs):
        res: SampleResult = sample(spec.denoiser, noise[start : start + bs], sigmas, solver_obj, stabilizer=stabilizer,
                                   dtype=dtype, progress=progress, callback=callback)
        outs.append(res.x)
        trace.extend(res.trace)
        nfe_used, extra, wall = res.nfe, max(extra, res.extra_passes), wall + res.wall_s
    return Generation(torch.cat(outs), nfe_used, extra, trace, wall, sigmas=sigmas, noise=noise)
