"""Stein stabilization of a solver step (Li & Zeng 2026, "SteinDiff", Algorithm 1).

For any step operator ``T`` the rectified update is (paper, Eq. for the rectified step)

    u_k     = x_k - T(x_k)
    x_{k-1} = x_k - gamma_k u_k                                   (gamma_k = 1: the plain solver)

with ``gamma* = E<u_k, x_k - x*> / E||u_k||^2`` minimizing ``E||x_{k-1} - x*||^2``.  Under
``x_k | x* ~ N(alpha_k x*, sigma_k^2 I)``, Stein's identity ``E<v(x), x - alpha x*> = sigma^2 E[div v]``
gives the reference-free estimate

    gamma_hat = max( ((1 - 1/alpha_k) s_xu + (sigma_k^2 / alpha_k) s_div) / s_uu , gamma_min )

with batch means ``s_xu = <u, x>``, ``s_uu = ||u||^2`` and the Hutchinson estimate ``s_div`` of
``div u = d - div T``.  The statistics live in the chosen state coordinates: ``ve`` (EDM,
``alpha = 1``, ``x`` as the solver carries it) or ``vp`` (``x_vp = alpha x``,
``alpha = 1/sqrt(1 + sigma^2)``, ``T_vp(x_vp) = alpha_{k-1} T(x_vp / alpha_k)``, so
``div T_vp = (alpha_{k-1}/alpha_k) div T``).  The correction is not invariant to this choice.

The stabilizer only calls the step operator ``T`` (:class:`steindiff.solvers.StepOperator`); it has
no knowledge of which solver it wraps.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Literal

import torch

from ..solvers import Step, StepOperator, detach_state
from .divergence import jvp_quadratic_forms, make_probes, unit_probes, vjp_quadratic_forms

__all__ = ["SteinStabilizer", "NotDifferentiableError", "coordinate_scales"]

Estimator = Literal["stein", "oracle", "lookahead"]


class NotDifferentiableError(RuntimeError):
    """The step operator's output does not depend differentiably on its input."""


def coordinate_scales(coords: str, sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """``(alpha_k, alpha_{k-1}, sigma_k)`` in the stabilizer's coordinates ``ve`` or ``vp``."""
    if coords == "ve":
        return 1.0, 1.0, sigma
    if coords == "vp":
        a, a_next = 1 / math.sqrt(1 + sigma**2), 1 / math.sqrt(1 + sigma_next**2)
        return a, a_next, a * sigma
    raise ValueError(f"coords must be 've' or 'vp', got {coords!r}")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product, float64."""
    return (a.to(torch.float64) * b.to(torch.float64)).reshape(a.shape[0], -1).sum(-1)


class SteinStabilizer:
    """Rescale every solver step by ``gamma_k`` (module docstring).

    Parameters
    ----------
    estimator:
        ``stein`` (the paper's reference-free coefficient), ``oracle`` (``gamma*`` from paired clean
        targets ``clean_target(x, sigma)``, e.g. a mixture's exact posterior mean, which equals the
        coupling's ``E[x* | x_k]``) or ``lookahead`` (our reading of the paper's "SC" variant: the
        clean target of ``x_k`` is replaced by the denoiser at the candidate ``T(x_k)``,
        ``gamma = <u, x - D(T(x), sigma_{k-1})> / ||u||^2``; one extra model pass per step, counted in
        NFE; no Jacobian products).
    divergence:
        ``vjp`` (reverse mode, default), ``jvp`` (forward mode, :func:`torch.func.jvp`) or ``exact``
        (trace of the full Jacobian with ``d`` unit probes: exact, costs ``d`` products).
    probes, probe_kind:
        Hutchinson probes ``P`` (paper: 5), ``gaussian`` or ``rademacher``.
    coords: ``ve`` or ``vp``.
    gamma_min, gamma_max: clip of ``gamma_hat`` (paper: ``max(., gamma_min)``; ``gamma_max=None`` no
        upper clip).  The paper states neither value; ``gamma_min = 0`` keeps the update from
        reversing the step.
    first_step, final_step: ``stein`` (correct as any step) or ``skip`` (``gamma = 1``) for the
        first step and a final step to ``sigma = 0``.  The paper does not say; the default corrects all.
    per_sample: one ``gamma`` per sample from its own statistics instead of batch means.
    reduce: optional function summing a tensor of statistics across processes (distributed
        sampling), so every rank uses the same ``gamma``.
    denoiser_divergence: optional exact ``div D(x, sigma)`` (mixtures) to report
        ``rho_k = b_k^2 / (c_k E_k)`` with ``E_k = E||x - D||^2 + sigma_ve^2 E[div D]`` (Tweedie).
    """

    def __init__(
        self,
        estimator: Estimator = "stein",
        *,
        divergence: Literal["vjp", "jvp", "exact"] = "vjp",
        probes: int = 5,
        probe_kind: Literal["gaussian", "rademacher"] = "gaussian",
        coords: Literal["ve", "vp"] = "ve",
        gamma_min: float = 0.0,
        gamma_max: float | None = None,
        first_step: Literal["stein", "skip"] = "stein",
        final_step: Literal["stein", "skip"] = "stein",
        per_sample: bool = False,
        batched_probes: bool = True,
        clean_target: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
        denoiser_divergence: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        exact_chunk: int = 64,
        seed: int = 0,
    ):
        if estimator not in ("stein", "oracle", "lookahead"):
            raise ValueError(f"estimator must be 'stein', 'oracle' or 'lookahead', got {estimator!r}")
        if divergence not in ("vjp", "jvp", "exact"):
            raise ValueError(f"divergence must be 'vjp', 'jvp' or 'exact', got {divergence!r}")
        if not isinstance(probes, int) or probes <= 0:
            raise ValueError(f"number of Hutchinson probes must be a positive integer, got {probes!r}")
        if probe_kind not in ("gaussian", "rademacher"):
            raise ValueError(f"probe_kind must be 'gaussian' or 'rademacher', got {probe_kind!r}")
        coordinate_scales(coords, 1.0, 0.5)  # validates coords
        if gamma_max is not None and gamma_max < gamma_min:
            raise ValueError(f"gamma_max ({gamma_max}) must be >= gamma_min ({gamma_min})")
        for name, v in (("first_step", first_step), ("final_step", final_step)):
            if v not in ("stein", "skip"):
                raise ValueError(f"{name} must be 'stein' or 'skip', got {v!r}")
        if estimator == "oracle" and clean_target is None:
            raise ValueError("the oracle estimator needs clean_target(x, sigma) (e.g. a mixture's exact denoiser)")
        self.estimator, self.divergence, self.probes, self.probe_kind = estimator, divergence, probes, probe_kind
        self.coords, self.gamma_min, self.gamma_max = coords, float(gamma_min), gamma_max
        self.first_step, self.final_step, self.per_sample = first_step, final_step, per_sample
        self.batched_probes, self.clean_target, self.denoiser_divergence = batched_probes, clean_target, denoiser_divergence
        self.reduce, self.exact_chunk = reduce, exact_chunk
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def name(self) -> str:
        return {"stein": "stein", "oracle": "stein-oracle", "lookahead": "stein-sc"}[self.estimator] + (
            "-exact" if self.divergence == "exact" and self.estimator == "stein" else "")

    # -- one step -------------------------------------------------------------------------------
    def step(self, op: StepOperator, x: torch.Tensor) -> tuple[torch.Tensor, Step, dict]:
        t0 = time.perf_counter()
        sigma, sigma_next = op.sigma, op.sigma_next
        a, a_next, sig_c = coordinate_scales(self.coords, sigma, sigma_next)
        record = {"step": op.i, "sigma": sigma, "sigma_next": sigma_next, "alpha": a, "coords": self.coords}
        skip = (op.is_first and self.first_step == "skip") or (sigma_next == 0 and self.final_step == "skip")
        if skip:
            with torch.no_grad():
                st = op(x)
            record.update(gamma=1.0, skipped=True, extra_passes=0, wall_s=time.perf_counter() - t0)
            return st.x_next, st, record
        if x.shape[0] < 2 and not self.per_sample:
            raise ValueError("Stein batch statistics need a batch of at least 2 samples (got 1); "
                             "use per_sample=True or a calibrated gamma schedule")
        calls0, extra0 = op.denoise.calls, op.denoise.extra_calls
        div_T, st = None, None
        if self.estimator == "stein" and self.divergence in ("vjp", "exact"):
            xg = x.detach().requires_grad_(True)
            with torch.enable_grad():
                st = op(xg)
            if not (st.x_next.requires_grad and st.denoised.requires_grad):
                raise NotDifferentiableError(
                    f"step {op.i} (sigma={sigma:.6g}): the model output does not depend differentiably on its input x; "
                    "the model must be differentiable for the Stein divergence (use a calibrated gamma schedule "
                    "(steindiff calibrate) or the 'lookahead' estimator, which need no Jacobian)")
            nfe_step = op.denoise.calls - calls0
            if self.divergence == "exact":
                V = unit_probes(x)
                q = torch.cat([vjp_quadratic_forms(st.x_next, xg, V[j : j + self.exact_chunk], self.batched_probes)
                               for j in range(0, V.shape[0], self.exact_chunk)]).sum(0)
                extra = V.shape[0] * nfe_step
            else:
                V = make_probes(x, self.probes, self.probe_kind, self.generator)
                q = vjp_quadratic_forms(st.x_next, xg, V, self.batched_probes).mean(0)
                extra = self.probes * nfe_step
            div_T = q.detach().to(torch.float64)
            st = Step(st.x_next.detach(), st.denoised.detach(), detach_state(st.state))
        else:
            with torch.no_grad():
                st = op(x)
            extra = 0
            if self.estimator == "stein":  # forward mode
                V = make_probes(x, self.probes, self.probe_kind, self.generator)
                with op.extra_passes():
                    q = jvp_quadratic_forms(lambda z: op(z).x_next, x, V).mean(0)
                div_T = q.detach().to(torch.float64)
                extra = op.denoise.extra_calls - extra0
        x_c, T_c = a * x.detach(), a_next * st.x_next
        u = x_c - T_c
        s_uu = _dot(u, u)
        s_xu = _dot(u, x_c)
        d = x[0].numel()
        if self.estimator == "stein":
            s_div = d - (a_next / a) * div_T
            num = (1 - 1 / a) * s_xu + (sig_c**2 / a) * s_div
        else:
            if self.estimator == "oracle":
                target = self.clean_target(x.detach(), sigma)
            else:
                with torch.no_grad():
                    target = st.x_next if sigma_next == 0 else op.denoise(st.x_next, sigma_next, op.i)
            s_div = None
            num = _dot(u, x_c - target)
        stats = torch.stack([num.sum(), s_uu.sum(), s_xu.sum(), (s_div.sum() if s_div is not None else num.new_zeros(())),
                             num.new_tensor(float(x.shape[0]))])
        if self.reduce is not None:
            stats = self.reduce(stats)
        n_tot = float(stats[4])
        m_num, m_uu, m_xu, m_div = (float(v) / n_tot for v in stats[:4])
        if not all(math.isfinite(v) for v in (m_num, m_uu, m_xu, m_div)):
            raise FloatingPointError(f"non-finite Stein statistics at step {op.i} (sigma={sigma:.6g}): "
                                     f"s_xu={m_xu}, s_uu={m_uu}, s_div={m_div}")
        scale = float(_dot(x_c, x_c).mean()) + 1e-30
        if m_uu <= 1e-24 * scale:
            raise ValueError(f"Stein coefficient undefined at step {op.i} (sigma={sigma:.6g}): the solver residual "
                             f"s_uu={m_uu:.3g} is ~0 (the step does not move the state)")
        if self.per_sample:
            g_raw = num / s_uu.clamp_min(1e-300)
            gamma_t = g_raw.clamp(min=self.gamma_min, max=self.gamma_max)
            gamma_raw, gamma = float(g_raw.mean()), float(gamma_t.mean())
            gam = gamma_t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        else:
            gamma_raw = m_num / m_uu
            gamma = max(gamma_raw, self.gamma_min)
            if self.gamma_max is not None:
                gamma = min(gamma, self.gamma_max)
            gam = gamma
        x_next = (x_c - gam * u) / a_next
        record.update(
            gamma=gamma, gamma_raw=gamma_raw, s_xu=m_xu, s_uu=m_uu,
            s_div=m_div if self.estimator == "stein" else None,
            extra_passes=int(extra), nfe_step=op.denoise.calls - calls0,
        )
        if self.denoiser_divergence is not None:
            with torch.no_grad():
                divD = self.denoiser_divergence(x.detach(), sigma).to(torch.float64)
            E_k = float((_dot(x_c - st.denoised, x_c - st.denoised) + sigma**2 * divD).mean())
            record["rho"] = gamma_raw**2 * m_uu / E_k if E_k > 0 else None
        record["wall_s"] = time.perf_counter() - t0
        return x_next.to(x.dtype), st, record
