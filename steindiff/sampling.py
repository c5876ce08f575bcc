"""The sampling loop: run a solver (optionally wrapped by a stabilizer) over a sigma schedule.

:func:`steps` is the loop itself, one :class:`StepEvent` per step; :func:`sample` runs it to the end
(samples, NFE, trace, wall time) and everything else that solves (generation, calibration, the
diagnostics) goes through one of the two."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from .device import check_model_device
from .noise import NoiseProcess, VEProcess
from .schedules import validate_sigmas
from .solvers import Denoise, Solver, Step, StepOperator, get_solver
from .stabilizers import Stabilizer

__all__ = ["sample", "steps", "StepEvent", "SampleResult", "prior_noise"]


@dataclass
class SampleResult:
    """Samples and accounting of one solve.

    ``nfe``: model passes per sample (each batched call counts once).  ``extra_passes``: Jacobian-
    product passes of a stabilizer per sample, counted apart.  ``trace``: one dict per step.
    """

    x: torch.Tensor
    nfe: int
    extra_passes: int = 0
    trace: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


def prior_noise(
    shape: Sequence[int],
    sigma_max: float,
    process: NoiseProcess | None = None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Initial state at ``sigma_max`` in VE coordinates: ``eps * prior_scale``, where ``prior_scale``
    is ``sigma_max`` for a VE process and ``sqrt(1 + sigma_max^2)`` for a VP one (``x_vp ~ N(0, I)``)."""
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
    eps = torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    scale = (process or VEProcess()).prior_scale(sigma_max)
    return eps * scale


@dataclass
class StepEvent:
    """One step of a solve, as :func:`steps` yields it: the step operator ``op`` (the solver's history
    at the step's input, its :class:`~steindiff.solvers.Denoise` counting the passes), the input state
    ``x``, the new state ``x_next``, the solver's :class:`~steindiff.solvers.Step` and the stabilizer's
    trace record (``None`` without a stabilizer)."""

    i: int
    op: StepOperator
    x: torch.Tensor
    x_next: torch.Tensor
    step: Step
    record: dict | None


def steps(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    solver: str | Solver = "euler",
    *,
    stabilizer: Stabilizer | None = None,
    extra_args: dict | None = None,
    progress: bool | str = False,
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
    solver_options: dict | None = None,
    checkpoint: bool = False,
) -> Iterator[StepEvent]:
    """The sampling loop, one :class:`StepEvent` per step: :func:`sample` and the diagnostics
    (:func:`steindiff.diagnostics.diagnose`) both run it.  The checks run before the first step.

    ``model(x, sigma, **extra_args)`` is a VE denoiser.  Each step is ``T(x)`` of the solver's step
    operator or, with a ``stabilizer`` (:class:`~steindiff.stabilizers.Stabilizer`), ``stabilizer.step(T,
    x) -> (x_next, step, record)``.  The state is kept in ``dtype`` (default: ``x``'s dtype, or float32 for
    half precision input).  ``progress`` shows a bar (labelled ``progress`` when a string, else the solver's name);
    ``check_finite`` refuses NaN or Inf model outputs (read back once
    per step, :meth:`~steindiff.solvers.Denoise.deferred_checks`, before the step is yielded);
    ``solver_options`` (e.g. ``order``) go to :func:`~steindiff.solvers.get_solver`.

    A differentiable solve: ``sigmas`` as a float64 tensor (or a sequence of 0-d tensors) that requires
    grad reaches the solvers as 0-d tensors (:mod:`steindiff.solvers.base`), and the steps run with autograd
    on when ``x`` or the noise levels require grad (otherwise without a graph, as always).  ``checkpoint``:
    each step's activations are recomputed in the backward pass (``torch.utils.checkpoint``), so a
    differentiable solve holds about one step's activations, not all of them.
    """
    check_model_device(model, x)
    sig = _levels(sigmas)
    solver = get_solver(solver, **(solver_options or {}))
    if dtype is None:
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if not x.is_floating_point() or dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state dtype must be float32 or float64, got {dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be batch-first with at least one sample, got shape {tuple(x.shape)}")
    x = x.to(dtype)
    denoise = Denoise(model, extra_args, check_finite=check_finite)
    state = solver.init_state()
    label = progress if isinstance(progress, str) else solver.name
    grad = torch.is_grad_enabled() and (x.requires_grad or any(isinstance(s, torch.Tensor) for s in sig))

    def run(op: StepOperator, x: torch.Tensor) -> tuple[torch.Tensor, Step, dict | None]:
        if stabilizer is None:
            with (contextlib.nullcontext() if grad else torch.no_grad()):
                step = op(x)
            return step.x_next, step, None
        return stabilizer.step(op, x)

    for i in tqdm(range(len(sig) - 1), disable=not progress, desc=label, leave=False):
        op = StepOperator(solver, denoise, i, sig, state)
        # the model outputs' finiteness is read back once per step, not once per model call (a read-back
        # waits for the device); a stabilizer may read it back with its own statistics (Denoise.settle)
        with denoise.deferred_checks():
            if checkpoint and grad:
                x_next, step, record = torch.utils.checkpoint.checkpoint(run, op, x, use_reentrant=False)
            else:
                x_next, step, record = run(op, x)
        yield StepEvent(i, op, x, x_next, step, record)
        x, state = x_next, step.state


def _levels(sigmas: Sequence[float] | torch.Tensor) -> list[float] | list[torch.Tensor]:
    """The noise levels as the solvers take them: floats, or 0-d float64 tensors when any requires grad
    (validated either way, :func:`~steindiff.schedules.validate_sigmas`)."""
    checked = validate_sigmas(sigmas.detach() if isinstance(sigmas, torch.Tensor) else
                              [float(s.detach()) if isinstance(s, torch.Tensor) else float(s) for s in sigmas])
    if isinstance(sigmas, torch.Tensor):
        if sigmas.requires_grad:
            return list(sigmas.to(torch.float64).unbind(0))
    elif any(isinstance(s, torch.Tensor) and s.requires_grad for s in sigmas):
        return [torch.as_tensor(s, dtype=torch.float64).reshape(()) for s in sigmas]
    return [float(s) for s in checked]


def sample(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Sequence[float] | torch.Tensor,
           solver: str | Solver = "euler", *, callback: Callable[[dict], None] | None = None,
           **options) -> SampleResult:
    """Solve the PF-ODE from ``x`` (VE state at ``sigmas[0]``) down the schedule ``sigmas``.

    ``options``: ``stabilizer``, ``extra_args``, ``progress``, ``dtype``, ``check_finite``,
    ``solver_options`` and ``checkpoint`` of :func:`steps` (which also says when a solve is differentiable).
    The stabilizer's records make the trace.  ``callback`` receives a dict with ``step``, ``sigma``,
    ``sigma_next``, ``x``, ``denoised`` after every step.

    Everything runs on ``x``'s device; a model whose parameters live elsewhere (or on ``meta``) is
    refused before any work (:func:`steindiff.device.check_model_device`).
    """
    trace: list[dict] = []
    extra_passes = 0
    t0 = time.perf_counter()
    for ev in steps(model, x, sigmas, solver, **options):
        if ev.record is not None:
            extra_passes += int(ev.record.get("extra_passes", 0))
            trace.append(ev.record)
        if callback is not None:
            callback({"step": ev.i, "sigma": ev.op.sigma, "sigma_next": ev.op.sigma_next, "x": ev.x_next,
                      "denoised": ev.step.denoised})
    x = ev.x_next
    if x.is_cuda:  # the wall time of the whole solve, not of its kernel launches
        torch.cuda.synchronize(x.device)
    return SampleResult(x=x, nfe=ev.op.denoise.calls, extra_passes=extra_passes, trace=trace,
                        wall_s=time.perf_counter() - t0)
