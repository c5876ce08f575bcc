"""A calibration's noise levels in the forms other tools take (``steindiff export``).

- ``diffusers``: the ``sigmas=`` list of a pipeline call.  VP models: VE levels with the final 0, for
  ``EulerDiscreteScheduler`` (its ``set_timesteps(sigmas=...)`` takes them as they are and computes the same
  fractional timesteps).  Flow models: the flow times *before* the scheduler's shift (the inverse of the shift for
  the calibration's ``shift`` or ``mu``), for ``FlowMatchEulerDiscreteScheduler`` (``set_timesteps(sigmas=...,
  mu=...)``), which shifts them back to the calibration's levels.  ``timesteps`` lists the model times the
  scheduler then uses.
- ``kdiffusion``: VE sigmas ending in 0 (k-diffusion's ``sigmas`` tensor).
- ``comfyui``: ComfyUI's sigmas, a comma-separated list for a ``ManualSigmas`` node: VE levels for VP models,
  flow times ``t`` for flow models (ComfyUI's flow models take ``t`` as their sigma).

Every export carries a usage line; where the calibration's gammas are not 1, that line says the tool cannot
apply them (it runs its plain solver on the levels) and what applies them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..noise import FlowProcess
from ._calibration import as_plan
from .diffusers import is_flow_scheduler
from .diffusers_flow import flow_scheduler_config

__all__ = ["FORMATS", "Export", "export_calibration"]

FORMATS = ("diffusers", "kdiffusion", "comfyui")


@dataclass
class Export:
    """One format's export: ``sigmas`` (what the tool takes), ``timesteps`` (diffusers: the model times it will
    use), ``mu`` (diffusers flow: the shift the levels were made for), ``usage`` (one line) and whether the tool
    applies the calibration's gammas (``gammas_applied``; ``gammas`` lists them)."""

    format: str
    sigmas: list[float]
    usage: str
    gammas: list[float] | None
    gammas_applied: bool
    timesteps: list[float] | None = None
    mu: float | None = None
    text: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _kind(meta: Mapping, scheduler_config: Mapping | None) -> str | None:
    """``flow``, ``vp`` or ``None`` (unknown: not made by calibrate-pipeline and no scheduler config given)."""
    if scheduler_config is not None:
        return "flow" if is_flow_scheduler(scheduler_config) or scheduler_config.get("process") == "flow" else "vp"
    made = meta.get("pipeline")
    if isinstance(made, Mapping) and made.get("process"):
        return "flow" if str(made["process"]).startswith("FlowProcess") else "vp"
    return None


def _gamma_note(gammas: list[float] | None, tool: str, applies: str) -> str:
    if gammas is None or all(g == 1.0 for g in gammas):
        return ""
    return (f"; the calibration's gammas are not 1 ({min(gammas):.3g} to {max(gammas):.3g}) and {tool} cannot apply "
            f"them: it runs its plain solver on these levels ({applies} applies them too)")


def export_calibration(calibration: Any, fmt: str, *, scheduler_config: Mapping | None = None,
                       mu: float | None = None) -> Export:
    """The noise levels of ``calibration`` (a file of ``steindiff calibrate``/``calibrate-pipeline``, a plan or a
    gamma schedule) in format ``fmt`` (:data:`FORMATS`).

    ``scheduler_config``: the pipeline's scheduler config (a mapping), needed for ``diffusers`` when the
    calibration does not record it (files of ``calibrate-pipeline`` do); ``mu``: the resolution shift of a flow
    scheduler with dynamic shifting, when the calibration does not record it.  Raises ValueError for an unknown
    format or a missing config or ``mu``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(calibration, os.PathLike):
        calibration = os.fspath(calibration)
    plan = as_plan(calibration, solver="dpmpp_2m")
    meta, sigmas = plan.meta, plan.sigmas
    made = meta.get("pipeline") if isinstance(meta.get("pipeline"), Mapping) else {}
    kind = _kind(meta, scheduler_config)
    gammas = None if plan.gammas is None else [float(g) for g in plan.gammas]
    solver = plan.solver
    source = calibration if isinstance(calibration, str) else "CAL.json"
    if fmt == "kdiffusion":
        note = "" if kind != "flow" else " (a flow model's VE levels, sigma = t / (1 - t): wrap it as a VE denoiser)"
        usage = (f"k-diffusion: sigmas = torch.tensor(SIGMAS); k_diffusion.sampling.sample_{solver}(model, "
                 f"noise * sigmas[0], sigmas){note}"
                 + _gamma_note(gammas, "k-diffusion", f"steindiff.integrations.kdiffusion.sample_{solver}(..., "
                                                      f"calibration={source!r})"))
        return Export(fmt, [float(s) for s in sigmas], usage, gammas, False)
    if fmt == "comfyui":
        values = FlowProcess.sigma_to_t(sigmas) if kind == "flow" else sigmas
        what = "flow times t (ComfyUI's sigma of a flow model)" if kind == "flow" else "VE sigmas"
        text = ", ".join(f"{float(v):.9g}" for v in values)
        usage = (f"ComfyUI: paste the list into a ManualSigmas node and feed its SIGMAS to SamplerCustom ({what}; "
                 f"fitted for {solver})" + _gamma_note(gammas, "ComfyUI", "steindiff's SteinDiffScheduler"))
        return Export(fmt, [float(v) for v in values], usage, gammas, False, text=text)
    # diffusers
    if kind is None:
        raise ValueError("the diffusers export needs the pipeline's scheduler config (this calibration does not "
                         "record one: pass scheduler_config, or use a file of `steindiff calibrate-pipeline`)")
    apply = "SteinDiffScheduler.from_config(pipe.scheduler.config, calibration=...)"
    if kind == "vp":
        ts = None
        cfg = scheduler_config if scheduler_config is not None else made.get("scheduler")
        if isinstance(cfg, Mapping):  # the fractional timesteps Euler computes from these sigmas
            from .diffusers import process_from_scheduler

            ts = process_from_scheduler({k: v for k, v in cfg.items() if k != "prediction_type"}).sigma_to_t(
                sigmas[:-1]).tolist()
        usage = ("diffusers: pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config); "
                 f"pipe(..., sigmas=SIGMAS) (Euler on these levels; they were fitted for {solver})"
                 + _gamma_note(gammas, "diffusers' scheduler", apply))
        return Export(fmt, [float(s) for s in sigmas], usage, gammas, False, timesteps=ts)
    if scheduler_config is not None:
        flow = flow_scheduler_config(scheduler_config)
    elif isinstance(made.get("scheduler"), Mapping):
        flow = flow_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **made["scheduler"]})
    else:
        raise ValueError("the diffusers export of a flow calibration needs the pipeline's scheduler config")
    if flow.use_dynamic_shifting:
        mu = made.get("mu") if mu is None else mu
        if mu is None:
            raise ValueError("the scheduler config sets use_dynamic_shifting=True: the export needs mu (the resolution "
                             "shift the calibration was made for)")
    t = FlowProcess.sigma_to_t(sigmas[:-1])
    given = flow.schedule(mu).unshifted(t)
    where = f" at {made['height']}x{made['width']} pixels" if made.get("height") else ""
    mu_text = f", mu={float(mu):.6g}" if flow.use_dynamic_shifting else ""
    usage = (f"diffusers: FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=SIGMAS{mu_text}), i.e. "
             f"pipe(..., sigmas=SIGMAS){where} (Euler on these levels; they were fitted for {solver})"
             + _gamma_note(gammas, "diffusers' scheduler", apply))
    return Export(fmt, [float(v) for v in given], usage, gammas, False,
                  timesteps=(t * flow.num_train_timesteps).tolist(),
                  mu=None if not flow.use_dynamic_shifting else float(mu))
