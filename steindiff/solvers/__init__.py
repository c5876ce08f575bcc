"""PF-ODE solvers as step operators ``T(x_k) -> x_{k+1}`` (see :mod:`steindiff.solvers.base`)."""

from __future__ import annotations

from typing import Any, Callable

from .base import Denoise, NonFiniteModelOutput, Solver, Step, StepOperator, steps_for_nfe
from .dpmpp import DPMSolverPP
from .euler import Euler, Heun
from .ipndm import IPNDM
from .unipc import UniPC

__all__ = [
    "SOLVERS", "get_solver", "Solver", "Step", "Denoise", "NonFiniteModelOutput", "steps_for_nfe", "StepOperator",
    "Euler", "Heun", "DPMSolverPP", "UniPC", "IPNDM",
]

SOLVERS: dict[str, Callable[..., Solver]] = {
    "euler": Euler,
    "ddim": Euler,
    "heun": Heun,
    "heun_flow": lambda **kw: Heun(**{"time": "flow", **kw}),
    "dpmpp_2m": lambda **kw: DPMSolverPP(order=2, **kw),
    "dpmpp_3m": lambda **kw: DPMSolverPP(order=3, **kw),
    "unipc": lambda **kw: UniPC(**{"variant": "bh2", **kw}),
    "unipc_bh1": lambda **kw: UniPC(**{"variant": "bh1", **kw}),
    "unipc_bh2": lambda **kw: UniPC(**{"variant": "bh2", **kw}),
    "ipndm": IPNDM,
    "ipndm_v": lambda **kw: IPNDM(variable_step=True, **kw),
}


def get_solver(name: str | Solver, **options: Any) -> Solver:
    """A solver by name (``euler``/``ddim``, ``heun``, ``heun_flow``, ``dpmpp_2m``, ``dpmpp_3m``,
    ``unipc``/``unipc_bh2``, ``unipc_bh1``, ``ipndm``, ``ipndm_v``), with solver options such as ``order``.  Its
    ``name`` is the registry's name of its configuration (the first of two aliases: ``euler`` for ``ddim``)."""
    if isinstance(name, Solver):
        return name
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    try:
        return SOLVERS[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for solver {name!r}: {e}") from None
