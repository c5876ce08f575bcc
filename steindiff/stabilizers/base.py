"""Per-step rescaling of any solver step: ``x_{k-1} = x_k - gamma_k (x_k - T(x_k))``.

:class:`GammaStabilizer` runs the step operator ``T`` (with the Jacobian products a variant asks
for), maps states to the chosen coordinates, reduces per-sample statistics over the batch (and
across processes), clips ``gamma`` and applies the update.  A variant only says which statistics it
needs (:meth:`GammaStabilizer.statistics`) and how they give ``gamma``
(:meth:`GammaStabilizer.coefficient`).  Nothing here knows which solver ``T`` comes from.

Coordinates: ``ve`` (EDM, ``alpha = 1``, the state as the solver carries it) or ``vp``
(``x_vp = alpha x`` with ``alpha = 1/sqrt(1 + sigma^2)``, ``T_vp(x_vp) = alpha_{k-1} T(x_vp/alpha_k)``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch

from ..device import is_out_of_memory
from ..noise import coordinate_scales
from ..solvers import Step, StepOperator
from ..solvers.base import cat_states, detach_state
from .divergence import jvp_quadratic_forms, make_probes, unit_probes, vjp_quadratic_forms

__all__ = ["Stabilizer", "GammaStabilizer", "StepStats", "NotDifferentiableError", "JacobianOutOfMemoryError", "dot",
           "rescaled_update", "JACOBIAN_PRECISIONS"]

#: ``jacobian_precision`` values of :class:`GammaStabilizer`.
JACOBIAN_PRECISIONS = ("fp32", "bf16")


class Stabilizer(Protocol):
    """What the sampling loop (:func:`steindiff.sampling.steps`) asks of a stabilizer: one step.

    ``step(op, x)`` gets the step operator ``T = op`` of the solver (its history fixed; ``op(x)`` is the
    solver's :class:`~steindiff.solvers.Step`) and the state ``x`` (VE), and returns ``(x_next, step,
    record)``: the new state, the solver's step at ``x`` (its history goes on to the next step) and a dict
    for the trace (``None``: nothing to record; ``record["extra_passes"]``: Jacobian-product passes per
    sample, counted apart from NFE).  Model passes made inside ``op.extra_passes()`` are not NFE.  The loop
    checks the step's model outputs for NaN and Inf after the step; a stabilizer that reads values back may
    read those checks with them (``op.denoise.pending_checks()`` and ``settle``, one read-back for both).

    A stabilizer gets everything it needs from outside when it is built (e.g. the reduction of its
    statistics across processes); nothing changes it afterwards.  Optional attributes read by callers:
    ``name``, ``coords`` (``ve``/``vp``) and ``per_sample`` (no batch statistics).
    """

    def step(self, op: StepOperator, x: torch.Tensor) -> tuple[torch.Tensor, Step, dict | None]: ...


class NotDifferentiableError(RuntimeError):
    """The model's output does not depend differentiably on its input."""


class JacobianOutOfMemoryError(RuntimeError):
    """A Jacobian-product pass ran out of memory; the message names the pass size and ``--jacobian-batch``."""


_POOL: list = []
_EXACT_CHUNK = 64  # unit probes per backward pass of the exact divergence


def _probe_pool():
    """One worker thread that draws CUDA runs' probes on the CPU while the GPU runs the forward pass
    (torch releases the GIL inside its operations)."""
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="steindiff-probes"))
    return _POOL[0]


def rescaled_update(x_next: torch.Tensor, u: torch.Tensor, gamma, alpha_next: float) -> torch.Tensor:
    """``x_{k-1} = (x_c - gamma u) / alpha_{k-1}``: the rectified step in coordinates, back to VE, from the solver's
    step ``x_next = T(x)`` (VE) and ``u = x_c - alpha_{k-1} T(x)``.  Written ``T(x) + (1 - gamma) u / alpha_{k-1}``:
    the same number, exactly ``T(x)`` at ``gamma = 1``, and no cancellation of a large state (a flow's first level,
    ``sigma`` near infinity) against ``u``."""
    return x_next + ((1 - gamma) / alpha_next) * u


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product, float64."""
    return (a.to(torch.float64) * b.to(torch.float64)).reshape(a.shape[0], -1).sum(-1)


@dataclass
class StepStats:
    """What a variant may use at step ``k``: the operator, the states in the chosen coordinates
    (``x_c = alpha_k x``, ``u = x_c - alpha_{k-1} T(x)``), the step output and, when requested, the
    per-sample Hutchinson (or exact) divergence of ``T`` or of ``D`` with respect to the VE state."""

    op: StepOperator
    x: torch.Tensor
    step: Step
    x_c: torch.Tensor
    u: torch.Tensor
    alpha: float
    alpha_next: float
    sigma_c: float
    dim: int
    div: torch.Tensor | None = None


class GammaStabilizer:
    """Base class of the per-step ``gamma`` stabilizers.

    ``jacobian_of``: ``None``, ``"T"`` (divergence of the step operator) or ``"D"`` (divergence of
    the denoiser output ``D(x_k)`` of the step); set by the variant.
    ``divergence``: ``vjp`` (reverse mode), ``jvp`` (forward mode) or ``exact`` (``d`` unit probes).
    ``gamma_min``/``gamma_max``: clip (``None`` for no bound).  ``first_step``/``final_step``:
    ``stein`` (correct as any step) or ``skip`` (``gamma = 1``) for the first step and for a final
    step to ``sigma = 0``.  ``per_sample``: one ``gamma`` per sample from its own statistics.
    ``name``: the registry's name of the stabilizer (default: the class's).

    What a stabilizer needs from outside is given here, never set afterwards: ``reduce`` sums a tensor
    of statistics across processes (distributed sampling); ``probe_source(x, n, generator) -> (n,
    *x.shape)`` draws the Hutchinson probes (default: Gaussian, on the CPU from ``generator``, moved to
    ``x``'s device; distributed sampling draws the global batch's and keeps its shard's);
    ``async_probes`` draws them in a worker thread during the forward pass (default ``None``: on CUDA).
    ``batched_probes``: all reverse-mode probes in one vmapped backward pass; default (``None``) on
    GPUs only (on CPU a loop of backward passes measured about 2x faster).
    ``jacobian_batch``: at most this many sample-probe pairs per Jacobian pass (samples in chunks
    through the differentiable step, probes in groups through the backward); ``None``: the whole
    batch and all probes at once.  Bounds the memory of the divergence, changes no result.
    Reverse mode (``vjp``) is the default and the cheaper one; forward mode (``jvp``) costs more
    time and memory here (one forward pass with tangents per probe).

    ``jacobian_precision``: ``"fp32"`` (default): in reverse mode the solver's step and the Jacobian
    pass share one forward pass with a graph (per step: the solver's model passes, each with a graph,
    then ``probes`` backward passes).  ``"bf16"``: the solver's step runs without a graph in the state's
    precision (the samples are the plain solver's), and the Jacobian pass alone (its own forward pass with a
    graph) runs under ``torch.autocast(x.device.type, torch.bfloat16)``;
    its backward runs in the precisions the forward recorded (PyTorch's autocast advice: no backward inside
    the autocast block).  Only the divergence estimate changes, and it is returned in float64 as in fp32.
    It costs one more forward pass per model pass of the step (counted in ``extra_passes``) and saves
    the graph's activations in bf16 where autocast runs an op in bf16.  The bf16 rounding of the
    Hutchinson estimate is small next to its Monte-Carlo noise (measured in ``docs/stabilizers.md``,
    ``benchmarks/jacobian_precision.py``).  Reverse mode (``vjp``) only: forward mode does not run under
    autocast, and the ``exact`` divergence is not an estimate.
    """

    name = "gamma"
    jacobian_of: str | None = None

    def __init__(
        self,
        *,
        name: str | None = None,
        coords: Literal["ve", "vp"] = "ve",
        divergence: Literal["vjp", "jvp", "exact"] = "vjp",
        probes: int = 5,
        gamma_min: float | None = 0.0,
        gamma_max: float | None = None,
        first_step: Literal["stein", "skip"] = "stein",
        final_step: Literal["stein", "skip"] = "stein",
        per_sample: bool = False,
        batched_probes: bool | None = None,
        jacobian_batch: int | None = None,
        jacobian_precision: Literal["fp32", "bf16"] = "fp32",
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        probe_source: Callable[[torch.Tensor, int, torch.Generator], torch.Tensor] | None = None,
        async_probes: bool | None = None,
        seed: int = 0,
    ):
        coordinate_scales(coords, 1.0, 0.5)
        if divergence not in ("vjp", "jvp", "exact"):
            raise ValueError(f"divergence must be 'vjp', 'jvp' or 'exact', got {divergence!r}")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes <= 0:
            raise ValueError(f"number of Hutchinson probes must be a positive integer, got {probes!r}")
        if jacobian_batch is not None and (isinstance(jacobian_batch, bool) or not isinstance(jacobian_batch, int)
                                           or jacobian_batch < 1):
            raise ValueError(f"jacobian_batch must be a positive integer (sample-probe pairs per Jacobian pass), "
                             f"got {jacobian_batch!r}")
        if jacobian_precision not in JACOBIAN_PRECISIONS:
            raise ValueError(f"jacobian_precision must be one of {', '.join(map(repr, JACOBIAN_PRECISIONS))}, "
                             f"got {jacobian_precision!r}")
        if jacobian_precision != "fp32" and divergence != "vjp":
            raise ValueError(f"jacobian_precision={jacobian_precision!r} is for the reverse-mode Hutchinson estimate "
                             f"(divergence 'vjp'), got divergence {divergence!r} (forward mode does not run under "
                             "autocast; the exact divergence runs in the state's precision)")
        if gamma_min is not None and gamma_max is not None and gamma_max < gamma_min:
            raise ValueError(f"gamma_max ({gamma_max}) must be >= gamma_min ({gamma_min})")
        for key, v in (("first_step", first_step), ("final_step", final_step)):
            if v not in ("stein", "skip"):
                raise ValueError(f"{key} must be 'stein' or 'skip', got {v!r}")
        if name is not None:
            self.name = name
        self.coords, self.divergence, self.probes = coords, divergence, probes
        self.gamma_min, self.gamma_max = gamma_min, gamma_max
        self.first_step, self.final_step, self.per_sample = first_step, final_step, per_sample
        self.batched_probes, self.jacobian_batch = batched_probes, jacobian_batch
        self.jacobian_precision = jacobian_precision
        self.reduce, self.probe_source, self.async_probes = reduce, probe_source, async_probes
        self.generator = torch.Generator().manual_seed(seed)

    # -- variant hooks --------------------------------------------------------------------------
    def statistics(self, s: StepStats) -> dict[str, torch.Tensor]:
        """Per-sample statistics (``(B,)`` float64 tensors); their batch means go to :meth:`coefficient`."""
        raise NotImplementedError

    def coefficient(self, m: dict, s: StepStats):
        """``gamma`` from the statistics ``m`` (floats: batch means; or per-sample tensors)."""
        raise NotImplementedError

    def jacobian_target(self, op: StepOperator) -> str | None:
        """Whose divergence step ``op`` needs: ``"T"``, ``"D"`` or ``None`` (default: :attr:`jacobian_of`)."""
        return self.jacobian_of

    def _batched(self, x: torch.Tensor) -> bool:
        return x.is_cuda if self.batched_probes is None else self.batched_probes

    def _shared_pass(self) -> bool:
        """Whether the solver's step is the Jacobian pass's own forward pass (reverse mode in the state's
        precision: one forward pass with a graph serves both); otherwise the step runs once without a
        graph and the Jacobian pass makes its own forward passes (forward mode, or ``jacobian_precision``
        other than fp32)."""
        return self.divergence != "jvp" and self.jacobian_precision == "fp32"

    def _precision(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """The autocast block of the Jacobian pass's forward passes (``jacobian_precision``)."""
        if self.jacobian_precision == "bf16":
            return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- the step -------------------------------------------------------------------------------
    def _probes(self, x: torch.Tensor) -> torch.Tensor:
        if self.divergence == "exact":
            return unit_probes(x)
        if self.probe_source is not None:
            return self.probe_source(x, self.probes, self.generator)
        return make_probes(x, self.probes, "gaussian", self.generator)

    def _probe_getter(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The probes of this step, when first asked for.  On CUDA they are drawn (on the CPU, from the
        stabilizer's generator: the same values) in a worker thread while the forward pass runs."""
        threaded = x.is_cuda if self.async_probes is None else self.async_probes
        fut = _probe_pool().submit(self._probes, x) if threaded else None
        box: list[torch.Tensor] = []

        def get() -> torch.Tensor:
            if not box:
                box.append(fut.result() if fut is not None else self._probes(x))
            return box[0]

        return get

    def _run_operator(self, op: StepOperator, x: torch.Tensor) -> tuple[Step, torch.Tensor | None, int]:
        """``T(x)`` and, if the variant asks, the per-sample divergence of ``T`` or ``D``.

        With ``jacobian_batch`` the samples go through the differentiable step in chunks (the solver's
        history sliced to match) and the probes through the backward passes in groups, so that at most
        ``jacobian_batch`` sample-probe pairs share one pass.  The probes are drawn for the whole
        batch first and every statistic is per sample, so chunking changes no result.  Each chunk's
        graph is released before the next one is built.  Where the step is not the Jacobian pass's own
        forward (:meth:`_shared_pass`), it runs first, for the whole batch without a graph, and the chunks
        compute the divergence only.  Out of memory here raises :class:`JacobianOutOfMemoryError` naming the
        pass size."""
        target = self.jacobian_target(op)
        if target is None:
            with torch.no_grad():
                return op(x), None, 0
        B = x.shape[0]
        probes = self._probe_getter(x)
        P = x[0].numel() if self.divergence == "exact" else self.probes
        jb = self.jacobian_batch
        chunk = B if jb is None else min(B, jb)
        group = None if jb is None else max(1, jb // chunk)
        shared = self._shared_pass()
        st = None
        if not shared:  # the plain solver's step: the samples do not depend on the Jacobian pass's precision
            with torch.no_grad():
                st = op(x)
        failed: str | None = None
        try:
            if chunk >= B:
                st_j, q, extra = self._jacobian_pass(op, x, probes, group, target, shared)
                return (st_j if shared else st), q, extra
            d = op.denoise
            steps, divs, sizes, extra = [], [], [], 0
            for j, start in enumerate(range(0, B, chunk)):
                sl = slice(start, min(B, start + chunk))
                calls, extra_calls = d.calls, d.extra_calls
                st_j, q_j, extra_j = self._jacobian_pass(op.restrict(sl, B), x[sl], lambda sl=sl: probes()[:, sl],
                                                         group, target, shared)
                if j == 0:
                    extra = extra_j
                else:  # one model pass of the step per sample: count the first chunk's passes only
                    d.calls, d.extra_calls = calls, extra_calls
                steps.append(st_j)
                divs.append(q_j)
                sizes.append(sl.stop - sl.start)
            if shared:
                st = Step(torch.cat([s_.x_next for s_ in steps]), torch.cat([s_.denoised for s_ in steps]),
                          cat_states([s_.state for s_ in steps], sizes))
            return st, torch.cat(divs), extra
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            per_pass = chunk * (1 if self.divergence == "jvp" else min(P, group or P))
            failed = (f"out of memory in the Jacobian pass of step {op.i} "
                      f"(sigma={op.sigma:.6g}) on {x.device}: batch of "
                      f"{B} samples, {chunk} samples x {P} probe(s) per differentiable step, about {per_pass} "
                      "sample-probe pairs per pass (--jacobian-batch "
                      f"{jb if jb is not None else 'not set: the whole batch'}); "
                      f"lower --jacobian-batch (e.g. --jacobian-batch {max(1, min(chunk, per_pass) // 2)})"
                      + ("; the jvp divergence needs more memory than vjp" if self.divergence == "jvp" else ""))
        finally:
            probes = None  # the probes' tensors go before the cache is emptied
        # out of the except block: the failed pass's tensors are gone with its traceback
        if x.is_cuda:
            torch.cuda.empty_cache()
        raise JacobianOutOfMemoryError(failed)

    def _jacobian_pass(self, op: StepOperator, x: torch.Tensor, probes: Callable[[], torch.Tensor], group: int | None,
                       target: str, shared: bool = True) -> tuple[Step | None, torch.Tensor, int]:
        """One chunk: the step (detached; ``None`` unless ``shared``: the step is the pass's own forward), its
        per-sample divergence (float64) and the extra passes per sample.  ``probes()`` gives this chunk's
        probes; asked for after a forward pass (the step's, or the pass's own)."""
        pick = (lambda st: st.x_next) if target == "T" else (lambda st: st.denoised)
        calls0, extra0 = op.denoise.calls, op.denoise.extra_calls
        if self.divergence == "jvp":
            V = probes()
            with op.extra_passes():
                q = jvp_quadratic_forms(lambda z: pick(op(z)), x, V).mean(0)
            return None, q.detach().to(torch.float64), op.denoise.extra_calls - extra0
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad(), (contextlib.nullcontext() if shared else op.extra_passes()), self._precision(x):
            st = op(xg)
        if not (st.x_next.requires_grad and st.denoised.requires_grad):
            raise NotDifferentiableError(
                f"step {op.i} (sigma={op.sigma:.6g}): the model output does not depend differentiably on its input x; "
                "the Stein divergence needs a differentiable model (alternatives: a calibrated gamma schedule "
                "from `steindiff calibrate`, or the look-ahead estimator stein-sc, which need no Jacobian)")
        # model passes of the step: NFE when shared, else this pass's own forward passes (extra)
        nfe_step = (op.denoise.calls - calls0) if shared else (op.denoise.extra_calls - extra0)
        V = probes()
        if self.divergence == "exact":
            group = _EXACT_CHUNK if group is None else min(group, _EXACT_CHUNK)
        q = vjp_quadratic_forms(pick(st), xg, V, self._batched(x), group)
        q = q.sum(0) if self.divergence == "exact" else q.mean(0)
        q = q.detach().to(torch.float64)
        if not shared:  # the forward passes and the backward passes are all extra
            return None, q, (V.shape[0] + 1) * nfe_step
        # detached copies only: the graph is freed when this returns
        st = Step(st.x_next.detach(), st.denoised.detach(), detach_state(st.state))
        return st, q, V.shape[0] * nfe_step

    def step(self, op: StepOperator, x: torch.Tensor) -> tuple[torch.Tensor, Step, dict]:
        """One stabilized step: ``(x_{k-1}, solver step, trace record)``."""
        t0 = time.perf_counter()
        sigma, sigma_next = op.sigma, op.sigma_next
        a, a_next, sig_c = coordinate_scales(self.coords, sigma, sigma_next)
        record: dict = {"step": op.i, "sigma": sigma, "sigma_next": sigma_next, "alpha": a, "coords": self.coords}
        if (op.is_first and self.first_step == "skip") or (sigma_next == 0 and self.final_step == "skip"):
            with torch.no_grad():
                st = op(x)
            record.update(gamma=1.0, skipped=True, extra_passes=0, wall_s=time.perf_counter() - t0)
            return st.x_next, st, record
        if x.shape[0] < 2 and not self.per_sample:
            raise ValueError("Stein batch statistics need a batch of at least 2 samples (got 1); "
                             "use per_sample=True or a calibrated gamma schedule")
        calls0 = op.denoise.calls
        x = x.detach()
        st, div, extra = self._run_operator(op, x)
        x_c = a * x
        s = StepStats(op, x, st, x_c, x_c - a_next * st.x_next, a, a_next, sig_c, x[0].numel(), div)
        per = self.statistics(s)
        names = list(per)
        sums = [per[k].sum() for k in names]
        if self.per_sample:  # the record's gamma is the mean over the whole batch (all processes) too
            g_raw = self.coefficient(per, s)
            g = g_raw.clamp(min=self.gamma_min, max=self.gamma_max)
            sums += [g_raw.sum(), g.sum()]
        stats = torch.stack([v.to(torch.float64) for v in sums]  # the batch count: a fill, not a copy from the host
                            + [torch.full((), float(x.shape[0]), dtype=torch.float64, device=x.device)])
        if self.reduce is not None:
            stats = self.reduce(stats)
        # everything this step reads back, in one read-back: on CUDA each read-back waits for the device
        back = [stats.to(torch.float64).reshape(-1)]
        if "uu" in names:
            back.append(dot(x_c, x_c).mean().reshape(1))
        flags = op.denoise.pending_checks()  # the step's model outputs were finite (Denoise.deferred_checks)
        if flags is not None:
            back.append(flags)
        vals = torch.cat([b.to(x.device) for b in back]).tolist()
        if flags is not None:  # a non-finite model output is named before the statistics it spoiled
            op.denoise.settle(vals[len(vals) - flags.numel():])
        n_stats = len(sums)
        n_tot = vals[n_stats]
        means = {k: v / n_tot for k, v in zip(names, vals)}
        rest = vals[n_stats + 1:]
        if not all(math.isfinite(v) for v in means.values()):
            raise FloatingPointError(f"non-finite stabilizer statistics at step {op.i} (sigma={sigma:.6g}): {means}")
        if "uu" in names:
            xx = rest.pop(0)
            if means["uu"] <= 1e-24 * (xx + 1e-30):
                raise ValueError(f"gamma undefined at step {op.i} (sigma={sigma:.6g}): the solver residual s_uu="
                                 f"{means['uu']:.3g} is ~0 (the step does not move the state)")
        if self.per_sample:
            gamma_raw, gamma = vals[len(names)] / n_tot, vals[len(names) + 1] / n_tot
            gam = g.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        else:
            gamma_raw = float(self.coefficient(means, s))
            gamma = gamma_raw
            if self.gamma_min is not None:
                gamma = max(gamma, self.gamma_min)
            if self.gamma_max is not None:
                gamma = min(gamma, self.gamma_max)
            gam = gamma
        x_next = rescaled_update(st.x_next, s.u, gam, a_next)
        record.update({"gamma": gamma, "gamma_raw": gamma_raw, **{f"s_{k}": v for k, v in means.items()},
                       "extra_passes": int(extra), "nfe_step": op.denoise.calls - calls0})
        record["wall_s"] = time.perf_counter() - t0
        return x_next.to(x.dtype), st, record
