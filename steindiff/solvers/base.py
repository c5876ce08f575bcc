"""Solvers as step operators.

A solver advances the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al.
2022, Eq. 3, VE coordinates) from ``sigmas[i]`` to ``sigmas[i + 1]``.  Each solver exposes exactly one
step as a pure function of the current state and the history it carries:

    step(denoise, x, i, sigmas, state) -> Step(x_next, denoised, state)

``x_next = T(x)`` is differentiable with respect to ``x`` through the model (the history in ``state``
is treated as constant), which is what a stabilizer wraps (:mod:`steindiff.stabilizers`).

The noise levels ``sigmas`` are Python floats, or 0-d float64 tensors (possibly requiring grad): every
solver is then differentiable in them too (the calibrated sampler's gradient fit,
:mod:`steindiff.gradient_fit`).  The step formulas are written once over scalar arithmetic that both
kinds support; the few functions that differ (``expm1``, a small linear solve) dispatch on the type
(:func:`scalar_expm1`, :func:`scalar_solve`), so the float path computes exactly what it always did.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["Step", "Solver", "Denoise", "NonFiniteModelOutput", "detach_state", "slice_state", "cat_states",
           "steps_for_nfe", "StepOperator", "Scalar", "scalar_expm1", "scalar_solve"]

#: A noise level or a coefficient computed from noise levels: a float, or a 0-d float64 tensor.
Scalar = float | torch.Tensor


def scalar_expm1(v: Scalar) -> Scalar:
    """``exp(v) - 1`` of a float (``math.expm1``) or of a 0-d tensor (``torch.expm1``, differentiable)."""
    return torch.expm1(v) if isinstance(v, torch.Tensor) else math.expm1(v)


def scalar_solve(rows: Sequence[Sequence[Scalar]], rhs: Sequence[Scalar]) -> list[Scalar]:
    """The solution ``a`` of the small linear system ``sum_k rows[j][k] a_k = rhs[j]``: floats from
    ``numpy.linalg.solve`` when every entry is a float, else 0-d float64 tensors from ``torch.linalg.solve``
    (differentiable in the entries)."""
    entries = [v for row in rows for v in row] + list(rhs)
    if not any(isinstance(v, torch.Tensor) for v in entries):
        import numpy as np

        return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64)).tolist()

    def t(v: Scalar) -> torch.Tensor:
        return torch.as_tensor(v, dtype=torch.float64)

    A = torch.stack([torch.stack([t(v) for v in row]) for row in rows])
    return list(torch.linalg.solve(A, torch.stack([t(v) for v in rhs])).unbind())


class NonFiniteModelOutput(FloatingPointError):
    """The model returned NaN or Inf."""


@dataclass
class Step:
    """One solver step: the candidate ``T(x_k)``, the denoised estimate ``D(x_k)`` and the new history."""

    x_next: torch.Tensor
    denoised: torch.Tensor
    state: dict = field(default_factory=dict)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a (nested: dicts, lists, tuples) solver state, the rest kept."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def detach_state(obj: Any) -> Any:
    """Detach every tensor in a (nested) solver state."""
    return _map_tensors(obj, torch.Tensor.detach)


def slice_state(obj: Any, sl: slice, n: int) -> Any:
    """The history of samples ``sl`` of a batch of ``n``: every tensor whose leading dimension is the
    batch is sliced, anything else (floats, noise levels) is kept."""
    return _map_tensors(obj, lambda t: t[sl] if t.ndim >= 1 and t.shape[0] == n else t)


def cat_states(parts: list, sizes: list[int]) -> Any:
    """Inverse of :func:`slice_state` over consecutive chunks of ``sizes`` samples: tensors whose
    leading dimension is their chunk's size are concatenated, anything else is taken from the first."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if all(isinstance(p, torch.Tensor) and p.ndim >= 1 and p.shape[0] == m for p, m in zip(parts, sizes)):
            return torch.cat(parts)
        return first
    if isinstance(first, dict):
        return {k: cat_states([p[k] for p in parts], sizes) for k in first}
    if isinstance(first, (list, tuple)) and all(len(p) == len(first) for p in parts):
        return type(first)(cat_states([p[j] for p in parts], sizes) for j in range(len(first)))
    return first


class Denoise:
    """Calls the model at one noise level, checks its output and counts passes (NFE).

    ``denoise(x, sigma, step)`` broadcasts the scalar ``sigma`` (a float or a 0-d tensor, whose gradient
    it keeps) to the batch, passes ``extra``
    through, casts the output to the state's dtype and raises a clear error on a wrong shape or a
    non-finite value (naming the step and sigma).
    """

    def __init__(self, model: Callable[..., torch.Tensor], extra: dict | None = None, check_finite: bool = True):
        self.model, self.extra, self.check_finite = model, extra or {}, check_finite
        self.calls = 0  # solver passes (NFE)
        self.extra_calls = 0  # passes made inside :meth:`extra_passes` (e.g. forward-mode probes)
        self._extra = False
        self._pending: list[tuple[torch.Tensor, int, float]] | None = None  # deferred finiteness checks

    @contextlib.contextmanager
    def deferred_checks(self) -> Iterator[None]:
        """Inside this block the finiteness check of each output is queued as a flag on the output's
        device instead of being read back at once (on CUDA a read-back waits for the device: one host
        synchronisation per model call).  Leaving the block reads every queued flag back at once (one
        synchronisation; none if a caller settled them already, see :meth:`pending_checks`) and raises
        :class:`NonFiniteModelOutput` naming the step and sigma of the first non-finite output.  The
        sampling loop (:func:`steindiff.sampling.steps`) wraps each step in it; outside it, every call
        is checked at once."""
        if self._pending is not None:  # nested: the outer block settles
            yield
            return
        self._pending = []
        try:
            yield
            self.settle()
        finally:
            self._pending = None

    def pending_checks(self) -> torch.Tensor | None:
        """The queued finiteness flags (1.0: finite) as one float64 tensor on the outputs' device, or
        ``None`` when none are queued: a caller that reads values back anyway appends them to its own read-back
        and passes the values to :meth:`settle` (one synchronisation for both)."""
        if not self._pending:
            return None
        return torch.stack([f for f, _, _ in self._pending]).to(torch.float64)

    def settle(self, values: Sequence[float] | None = None) -> None:
        """Resolve the first ``len(values)`` queued checks with their read-back ``values`` (default: read all of
        them back here, one synchronisation) and raise :class:`NonFiniteModelOutput` for the first one not finite."""
        if not self._pending:
            return
        if values is None:
            values = self.pending_checks().tolist()
        done = self._pending[: len(values)]
        del self._pending[: len(values)]
        for ok, (_, step, sigma) in zip(values, done):
            if not ok:
                self._pending.clear()
                raise NonFiniteModelOutput(f"model returned NaN or Inf at step {step} (sigma={sigma:.6g})")

    @contextlib.contextmanager
    def extra_passes(self) -> Iterator[None]:
        """Count the model passes made inside this block as extra passes, not NFE."""
        prev, self._extra = self._extra, True
        try:
            yield
        finally:
            self._extra = prev

    def __call__(self, x: torch.Tensor, sigma: Scalar, step: int) -> torch.Tensor:
        if isinstance(sigma, torch.Tensor):
            s = sigma.to(dtype=x.dtype, device=x.device).reshape(1).repeat(x.shape[0])
        else:
            s = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        out = self.model(x, s, **self.extra)
        if self._extra:
            self.extra_calls += 1
        else:
            self.calls += 1
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model output at step {step} (sigma={sigma:.6g}) has shape {got}, "
                             f"expected {tuple(x.shape)}")
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if not self.check_finite:
            return out
        if self._pending is not None:  # queued on the device: read back with the step's other values
            self._pending.append((torch.isfinite(out.detach()).all(), step, sigma))
        # a NaN or Inf anywhere makes the sum non-finite: one reduction, the full check only then
        elif not bool(torch.isfinite(out.detach().sum())) and not bool(torch.isfinite(out.detach()).all()):
            raise NonFiniteModelOutput(f"model returned NaN or Inf at step {step} (sigma={sigma:.6g})")
        return out


class Solver:
    """Base class.  Subclasses implement :meth:`step` and set ``order`` and ``name``, the name of the
    configuration in :data:`steindiff.solvers.SOLVERS` (a property where options change it)."""

    name = "solver"
    order: int = 1

    def init_state(self) -> dict:
        """History before the first step."""
        return {}

    def step(self, denoise: Denoise, x: torch.Tensor, i: int, sigmas: list[Scalar], state: dict) -> Step:
        raise NotImplementedError

    def nfe(self, sigmas: list[float] | torch.Tensor) -> int:
        """Model passes per sample for a full solve on ``sigmas`` (one per step by default)."""
        return len(sigmas) - 1

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


class StepOperator:
    """The step operator ``T`` of step ``i``: ``T(x) = solver.step(denoise, x, i, sigmas, state)``
    with the solver's history fixed.  This is all a stabilizer sees of a solver."""

    def __init__(self, solver: Solver, denoise: Denoise, i: int, sigmas: list[Scalar], state: dict):
        self.solver, self.denoise, self.i, self.sigmas, self.state = solver, denoise, i, sigmas, state
        self.sigma, self.sigma_next = sigmas[i], sigmas[i + 1]

    def __call__(self, x: torch.Tensor) -> Step:
        return self.solver.step(self.denoise, x, self.i, self.sigmas, self.state)

    def with_denoise(self, denoise: Denoise) -> "StepOperator":
        """The same step with another model wrapper (e.g. one that feeds the model other noise levels)."""
        return StepOperator(self.solver, denoise, self.i, self.sigmas, self.state)

    def restrict(self, sl: slice, n: int) -> "StepOperator":
        """The same step on the samples ``sl`` of the batch of ``n`` (the history sliced to match)."""
        if sl == slice(0, n):
            return self
        return StepOperator(self.solver, self.denoise, self.i, self.sigmas, slice_state(self.state, sl, n))

    def extra_passes(self) -> contextlib.AbstractContextManager:
        """Context in which model passes count as extra (Jacobian-product) passes, not NFE."""
        return self.denoise.extra_passes()

    @property
    def is_first(self) -> bool:
        return self.i == 0

    @property
    def is_last(self) -> bool:
        return self.i == len(self.sigmas) - 2


def steps_for_nfe(solver: Solver, nfe: int) -> int:
    """The largest number of steps whose full solve (ending at ``sigma = 0``) costs at most ``nfe`` model
    passes per sample."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    steps = 0
    # a placeholder schedule of each length: only its length and final zero matter to ``nfe``
    while solver.nfe([float(steps + 1 - i) for i in range(steps + 2)]) <= nfe:
        steps += 1
    if steps < 1:
        raise ValueError(f"solver {solver.name!r} needs more than nfe={nfe} model passes for one step")
    return steps
