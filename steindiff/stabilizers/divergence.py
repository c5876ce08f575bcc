"""Divergence of a map ``f: R^{B x d} -> R^{B x d}`` (acting sample-wise) per sample.

Hutchinson (1990): ``div f(x) = E_v[v^T J_f(x) v]`` for probes with ``E[v v^T] = I`` (Gaussian or
Rademacher).  ``v^T J v`` comes from one vector-Jacobian product (reverse mode) or one
Jacobian-vector product (forward mode, :func:`torch.func.jvp`).  ``exact`` takes the trace of the
full Jacobian with ``d`` unit probes.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._forward_ad import load_quietly

__all__ = ["make_probes", "unit_probes", "vjp_quadratic_forms", "jvp_quadratic_forms"]


def make_probes(x: torch.Tensor, n: int, kind: str = "gaussian", generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` probes shaped like ``x``, stacked on a new leading axis: ``(n, *x.shape)``."""
    if n < 1:
        raise ValueError(f"number of probes must be >= 1, got {n}")
    if kind == "gaussian":
        v = torch.randn((n, *x.shape), generator=generator, dtype=x.dtype, device="cpu")
    elif kind == "rademacher":
        v = torch.randint(0, 2, (n, *x.shape), generator=generator, device="cpu").to(x.dtype) * 2 - 1
    else:
        raise ValueError(f"probe kind must be 'gaussian' or 'rademacher', got {kind!r}")
    return v.to(x.device)


def unit_probes(x: torch.Tensor) -> torch.Tensor:
    """The ``d`` unit vectors (same for every sample): their quadratic forms sum to the exact trace."""
    d = x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:])
    return eye.expand(d, *x.shape)


def vjp_quadratic_forms(out: torch.Tensor, x: torch.Tensor, probes: torch.Tensor, batched: bool = True) -> torch.Tensor:
    """``v_p^T J v_p`` per probe and sample, ``(P, B)``, by reverse mode from a graph ``out = f(x)``.

    ``batched`` runs all probes in one vmapped backward pass (``is_grads_batched``); it falls back to
    one backward pass per probe where the graph does not support batching.
    """
    if batched and probes.shape[0] > 1:
        try:
            (g,) = torch.autograd.grad(out, x, grad_outputs=probes, retain_graph=True, is_grads_batched=True)
            return (g * probes).reshape(probes.shape[0], x.shape[0], -1).sum(-1)
        except RuntimeError:
            pass
    rows = []
    for v in probes:
        (g,) = torch.autograd.grad(out, x, grad_outputs=v, retain_graph=True)
        rows.append((g * v).reshape(x.shape[0], -1).sum(-1))
    return torch.stack(rows)


def jvp_quadratic_forms(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``v_p^T J v_p`` per probe and sample, ``(P, B)``, by forward mode (one JVP per probe)."""
    load_quietly()
    rows = []
    for v in probes:
        _, jv = torch.func.jvp(f, (x,), (v,))
        rows.append((jv * v).reshape(x.shape[0], -1).sum(-1))
    return torch.stack(rows)
