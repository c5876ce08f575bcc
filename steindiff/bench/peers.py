"""Peers as benchmark rows: learned-schedule and learned-solver methods, run from the same teacher, the same
calibration noise and the same evaluation noise as the calibrated sampler (``cal:trajectory``).

A peer is a named function that, given the model (an opaque callable), the plain plan of a cell, the
calibration noise and the teacher (the fine solve of that noise, :class:`~steindiff.trajectory.ReferenceSolve`,
shared with ``cal:trajectory``), returns the :class:`~steindiff.plan.SamplingPlan` it would sample with.  The
bench labels its rows ``peer:<name>`` (``steindiff bench --peers gits``), fits it once per cell and applies the
plan to every evaluation seed, with no extra model pass at sampling time.  Add one with :func:`register_peer`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..peers import gits_plan, ld3_plan
from ..plan import SamplingPlan
from ..trajectory import ReferenceSolve

__all__ = ["Peer", "PEERS", "PREFIX", "register_peer", "peer_name", "fit_peer"]

#: The stabilizer label of a peer's rows: ``peer:<name>``.
PREFIX = "peer:"

#: ``fit(model, base, noise, teacher, *, sigma_min, extra_args, **options) -> SamplingPlan``
PeerFit = Callable[..., SamplingPlan]


@dataclass(frozen=True)
class Peer:
    """A named peer: ``fit`` (signature :data:`PeerFit`), the paper it implements, and the distance its fit
    minimises (the protocol asks each result to say it; a fit must never use a metric's features)."""

    name: str
    fit: PeerFit
    paper: str
    distance: str


PEERS: dict[str, Peer] = {}


def register_peer(peer: Peer) -> None:
    """Make ``peer`` available to the bench as ``peer:<name>``."""
    if not peer.name or PREFIX in peer.name or "," in peer.name:
        raise ValueError(f"bad peer name {peer.name!r}")
    PEERS[peer.name] = peer


def peer_name(label: str) -> str | None:
    """The peer of a stabilizer label ``peer:<name>`` (``None`` for any other label); raises for an unknown one."""
    if not label.startswith(PREFIX):
        return None
    name = label[len(PREFIX):]
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS) or 'none'}")
    return name


def fit_peer(label: str, model: Callable[..., torch.Tensor], base: SamplingPlan, noise: torch.Tensor,
             teacher: ReferenceSolve, *, sigma_min: float, extra_args: dict | None = None,
             **options: Any) -> SamplingPlan:
    """The plan of peer ``label`` (``peer:<name>`` or ``<name>``) for the plain plan ``base``; its
    ``meta["peer"]`` records the peer, the distance its fit minimised, the options and the fit's wall time.
    ``options`` go to the peer's fit in place of the paper's settings (LD3: the keywords of
    :func:`~steindiff.peers.ld3.ld3_plan`, e.g. a smaller ``max_iters``; GITS: of
    :func:`~steindiff.peers.gits.gits_plan`)."""
    name = peer_name(label if label.startswith(PREFIX) else PREFIX + label)
    peer = PEERS[name]
    t0 = time.perf_counter()
    plan = peer.fit(model, base, noise, teacher, sigma_min=sigma_min, extra_args=extra_args, **options)
    plan.meta["peer"] = {"name": name, "paper": peer.paper, "distance": peer.distance, "options": dict(options),
                         "wall_s": time.perf_counter() - t0}
    return plan


def _gits(model: Callable[..., torch.Tensor], base: SamplingPlan, noise: torch.Tensor, teacher: ReferenceSolve, *,
          sigma_min: float, extra_args: dict | None = None, **options: Any) -> SamplingPlan:
    """GITS with the paper's settings unless ``options`` says otherwise (:func:`~steindiff.peers.gits.gits_plan`);
    the noise is the teacher's."""
    return gits_plan(model, base, teacher, extra_args=extra_args, **options)


register_peer(Peer("gits", _gits, "Chen et al. 2024, arXiv 2405.11326 (GITS)",
                   "L2 between one solver step from the teacher's state and the teacher's next state, on a grid of "
                   "60 of the teacher's noise levels (dynamic programming, later jumps weighted 1.15x each)"))


def _ld3(model: Callable[..., torch.Tensor], base: SamplingPlan, noise: torch.Tensor, teacher: ReferenceSolve, *,
         sigma_min: float, extra_args: dict | None = None, **options: Any) -> SamplingPlan:
    """LD3 with the paper's settings unless ``options`` says otherwise (:func:`~steindiff.peers.ld3.ld3_plan`:
    100 teacher pairs, radius 1, L2, 300 steps)."""
    return ld3_plan(model, base, noise, teacher, sigma_min=sigma_min, extra_args=extra_args, **options)


register_peer(Peer("ld3", _ld3, "Tong et al. 2025, arXiv 2405.15506 (LD3)",
                   "L2 (LPIPS is unavailable offline) between the few-step solve and the teacher's final samples, "
                   "on 100 teacher pairs (50 fit, 50 early-stop), the start free within r sigma_T = sigma_T of the "
                   "teacher's noise (soft teacher forcing)"))
