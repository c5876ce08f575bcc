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

__all__ = ["make_probes", "draw_probes", "to_device", "unit_probes", "vjp_quadratic_forms", "jvp_quadratic_forms"]


def draw_probes(shape: tuple[int, ...], n: int, kind: str = "gaussian", generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` probes of ``shape`` on the CPU, ``(n, *shape)``: drawn from a CPU generator, so a seed
    gives the same probes whatever device they are then moved to."""
    if n < 1:
        raise ValueError(f"number of probes must be >= 1, got {n}")
    if kind == "gaussian":
        return torch.randn((n, *shape), generator=generator, dtype=dtype, device="cpu")
    if kind == "rademacher":
        return torch.randint(0, 2, (n, *shape), generator=generator, device="cpu").to(dtype) * 2 - 1
    raise ValueError(f"probe kind must be 'gaussian' or 'rademacher', got {kind!r}")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor moved to ``device`` without waiting for it: to CUDA through pinned memory with a
    non-blocking copy, ordered on the current stream before anything that uses it (a plain copy from pageable
    memory waits for the stream, a host synchronisation).  Other devices: a plain copy."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def make_probes(x: torch.Tensor, n: int, kind: str = "gaussian",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` probes shaped like ``x``, stacked on a new leading axis: ``(n, *x.shape)``, on ``x``'s
    device (drawn on the CPU, :func:`draw_probes`, and moved by :func:`to_device`)."""
    return to_device(draw_probes(tuple(x.shape), n, kind, generator, x.dtype), x.device)


def unit_probes(x: torch.Tensor) -> torch.Tensor:
    """The ``d`` unit vectors (same for every sample): their quadratic forms sum to the exact trace."""
    d = x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:])
    return eye.expand(d, *x.shape)


def vjp_quadratic_forms(out: torch.Tensor, x: torch.Tensor, probes: torch.Tensor, batched: bool = True,
                        group: int | None = None) -> torch.Tensor:
    """``v_p^T J v_p`` per probe and sample, ``(P, B)``, by reverse mode from a graph ``out = f(x)``.

    Probes go through the backward pass ``group`` at a time (default: all at once).  ``batched``
    runs a group in one vmapped backward pass (``is_grads_batched``), falling back to one pass per
    probe where the graph does not support batching (or the batched pass runs out of memory).  The
    graph is retained only for the passes that still need it: the last one frees it as it goes.
    """
    P = probes.shape[0]
    g_size = P if group is None else max(1, int(group))
    rows: list[torch.Tensor] = []
    for start in range(0, P, g_size):
        V = probes[start : start + g_size]
        last_group = start + g_size >= P
        if batched and V.shape[0] > 1:
            try:
                # retained even for the last group: a failed batched pass falls back to the loop below
                (g,) = torch.autograd.grad(out, x, grad_outputs=V, retain_graph=True, is_grads_batched=True)
                rows.append((g * V).reshape(V.shape[0], x.shape[0], -1).sum(-1))
                continue
            except RuntimeError:
                pass
        for j, v in enumerate(V):
            (g,) = torch.autograd.grad(out, x, grad_outputs=v, retain_graph=not (last_group and j == V.shape[0] - 1))
            rows.append((g * v).reshape(1, x.shape[0], -1).sum(-1))
    return torch.cat(rows)


def jvp_quadratic_forms(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        probes: torch.Tensor) -> torch.Tensor:
    """``v_p^T J v_p`` per probe and sample, ``(P, B)``, by forward mode (one JVP per probe).

    Forward mode costs more than reverse mode here (a full forward pass with tangents per probe,
    and more memory): prefer :func:`vjp_quadratic_forms`."""
    load_quietly()
    rows = []
    for v in probes:
        _, jv = torch.func.jvp(f, (x,), (v,))
        rows.append((jv * v).reshape(x.shape[0], -1).sum(-1))
        del jv
    return torch.stack(rows)
