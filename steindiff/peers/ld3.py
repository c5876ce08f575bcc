"""LD3: the time steps and the model's input times learned by backpropagation through the few-step solve
(Tong, Hoang, Liu, Van den Broeck and Niepert 2025, "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025,
arXiv 2405.15506).  Written from the paper; no code copied.  Built on the calibrated sampler's gradient engine
(:func:`steindiff.gradient_fit.gradient_fit`): the same differentiable solvers, the same fit loop.

Parameters (LD3's "decoupled" discretisation, Sec. 3):

- the interior noise levels ``sigma_1 > ... > sigma_{N-1}``, as gaps through a softmax, so they stay ordered
  (the engine's ``steps``: ``log sigma_i = log sigma_0 - L cumsum(softmax(z))_i``, LD3's parameterisation in
  log-SNR, since ``lambda = -2 log sigma``);
- the noise level given to the model at each level, ``s_j = sigma_j exp(delta_j)`` (the engine's
  ``model_sigmas``), each ``|delta_j|`` within ``window`` times the plain schedule's smallest log-gap (LD3's
  window: half the smallest step), the first level's kept at ``sigma_0``.

Loss with soft teacher forcing (LD3, Eq. 6): the student may start from any point of a small ball around the
teacher's noise,

    min_theta  E_{x_T}  min_{||x'_T - x_T|| <= r sigma_T}  d(Psi_theta(x'_T), Psi*(x_T)),

``Psi*`` the teacher (here the fine solve the calibrated sampler fits to,
:class:`~steindiff.trajectory.ReferenceSolve`), ``Psi_theta`` the few-step solve.  The inner minimum is taken
jointly with ``theta``: a free start offset per training pair, projected back onto the ball after every step
(the engine's ``teacher_ball``, whose radius is relative to ``||x_T||``; ``||x_T|| ~ sigma_T sqrt(d)``, so the
radius ``r sigma_T`` is ``teacher_ball = r / sqrt(d)``).  ``r = 1`` by default (the authors' setting).  LD3
minimises LPIPS; LPIPS needs a network trained on image data that is not available offline, so ``d`` is the
squared L2 distance per coordinate (the paper's L2 ablation) unless a ``features`` function is given.

Teacher pairs: LD3 fits on about 100 (half fit, half validate and early-stop); here the first ``pairs`` of the
calibration batch (default 100).  The fitted sampler starts from the user's noise, with the plain solver's
model passes per sample.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..gradient_fit import gradient_fit
from ..plan import SamplingPlan
from ..trajectory import ReferenceSolve

__all__ = ["ld3_plan", "LD3_PARAMS", "DEFAULT_PAIRS", "DEFAULT_RADIUS", "DEFAULT_WINDOW"]

#: What LD3 fits: the interior noise levels and the model's decoupled input levels.
LD3_PARAMS = ("steps", "model_sigmas")
#: Teacher pairs (the paper's ~100: half fit, half early-stop).
DEFAULT_PAIRS = 100
#: Soft teacher forcing radius ``r``: the student's start within ``r sigma_T`` of the teacher's noise.
DEFAULT_RADIUS = 1.0
#: LD3's window: each model input level within this fraction of the smallest step (in log sigma).
DEFAULT_WINDOW = 0.5


def model_sigma_bounds(base: SamplingPlan, window: float = DEFAULT_WINDOW) -> list[float]:
    """LD3's window for ``delta_j = log(s_j / sigma_j)``: 0 at the first level, elsewhere ``window`` times the
    smallest gap ``log sigma_i - log sigma_{i+1}`` between ``base``'s levels above 0."""
    levels = [float(s) for s in base.sigmas[:-1]]
    gaps = [math.log(a) - math.log(b) for a, b in zip(levels, levels[1:])]
    bound = window * min(gaps) if gaps else 0.0
    return [0.0] + [bound] * (base.steps - 1)


def ld3_plan(model: Callable[..., torch.Tensor], base: SamplingPlan, noise: torch.Tensor, ref: ReferenceSolve, *,
             sigma_min: float, pairs: int = DEFAULT_PAIRS, radius: float = DEFAULT_RADIUS,
             window: float = DEFAULT_WINDOW, features: Callable[[torch.Tensor], torch.Tensor] | None = None,
             lr: float = 0.03, batch_size: int = 10, max_iters: int = 300, max_seconds: float = 600.0,
             val_every: int = 10, patience: int = 8, seed: int = 0, extra_args: dict | None = None,
             progress: bool = False) -> SamplingPlan:
    """LD3's plan for the plain plan ``base`` (its solver, its number of steps), fitted to the teacher ``ref``
    (the fine solve of ``noise``) on the first ``pairs`` of them, the first half fitting and the second
    early-stopping (module docstring).  ``radius``: soft teacher forcing ``r`` (0: none).  ``window``: bound of
    the decoupled model levels (:func:`model_sigma_bounds`).  ``features``: a distance in ``features(x)`` instead
    of L2.  The rest is the gradient engine's budget (:func:`~steindiff.gradient_fit.gradient_fit`).

    The plan's ``meta["ld3"]`` records the pairs, the radius, the window, the distance, the teacher and the
    fit's record (iterations, why it stopped, held-out loss at the start and at the best, wall time)."""
    if isinstance(pairs, bool) or int(pairs) != pairs or pairs < 4:
        raise ValueError(f"pairs must be a whole number >= 4 (half fit, half early-stop), got {pairs!r}")
    if radius < 0 or window < 0:
        raise ValueError(f"radius and window must be >= 0, got {radius} and {window}")
    if ref.final.shape[0] != noise.shape[0] or ref.final.shape[1:] != noise.shape[1:]:
        raise ValueError(f"the teacher's {tuple(ref.final.shape)} samples do not match the noise's "
                         f"{tuple(noise.shape)}")
    if abs(float(base.sigmas[0]) - float(ref.sigmas[0])) > 1e-6 * float(base.sigmas[0]):
        raise ValueError(f"the teacher starts at sigma {float(ref.sigmas[0]):.6g}, the plan at "
                         f"{float(base.sigmas[0]):.6g}: solve the teacher from the plan's first noise level")
    k = min(int(pairs), noise.shape[0])
    if k < 4:
        raise ValueError(f"LD3 needs at least 4 teacher pairs, the calibration batch has {noise.shape[0]}")
    n_fit = k // 2
    fit, held = slice(0, n_fit), slice(n_fit, k)
    target = ref.final.to(noise.dtype)

    def part(s: slice) -> dict | None:
        if not extra_args:
            return extra_args
        total = noise.shape[0]
        return {key: (v[s] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == total else v)
                for key, v in extra_args.items()}

    ball = radius / math.sqrt(noise[0].numel())
    plan, info = gradient_fit(model, base, noise[fit], target[fit], val_noise=noise[held], val_target=target[held],
                              sigma_floor=sigma_min, params=LD3_PARAMS, loss="l2" if features is None else "features",
                              features=features, teacher_ball=ball,
                              model_sigma_bound=model_sigma_bounds(base, window), lr=lr,
                              batch_size=batch_size, max_iters=max_iters, max_seconds=max_seconds,
                              val_every=val_every, patience=patience, seed=seed, extra_args=part(fit),
                              val_extra_args=part(held), progress=progress)
    record = {"pairs": k, "n_fit": n_fit, "radius": radius, "teacher_ball": ball, "window": window,
              "params": list(LD3_PARAMS), "distance": info["distance"],
              "teacher": {"solver": ref.solver, "steps": ref.steps},
              "fit": {key: info.get(key) for key in ("iters", "best_iter", "stopped", "val_start", "val_best",
                                                     "wall_s", "fit_loss_scale")}}
    return SamplingPlan(base.solver, plan.sigmas, "ld3", None, base.coords, dict(base.solver_options),
                        {"name": "ld3", "ld3": record}, plan.model_sigmas, None)
