"""A diffusers scheduler that runs steindiff's solvers, and calibrations, inside unmodified pipelines.

::

    pipe.scheduler = SteinDiffScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")
    image = pipe(prompt, num_inference_steps=8).images[0]

:class:`SteinDiffScheduler` is a ``SchedulerMixin``/``ConfigMixin`` built from the pipeline's own scheduler config
(VP: the betas and ``prediction_type`` of Stable Diffusion and its relatives; flow matching: the shift of
Stable Diffusion 3 and FLUX).  Each ``step()`` feeds the pipeline's model output to the library's own step
operator (:class:`~steindiff.solvers.StepOperator`, through :class:`~steindiff.solvers.Denoise`): the solver's
history is held between calls, the state is in VE coordinates, and a solver that evaluates the model twice in a
step (Heun) hands the pipeline its intermediate point as the next latents, the way diffusers' Heun scheduler does.
Coordinates: the pipeline's latents are ``x_vp = alpha x_ve`` (VP, ``alpha = 1/sqrt(1 + sigma^2)``) or
``x_t = x_ve / (1 + sigma)`` (flow), and the model output (epsilon, v, sample; flow velocity) becomes the
denoised estimate through the library's adapters (:class:`~steindiff.models.VPDenoiser`,
:class:`~steindiff.models.FlowDenoiser`), so the pipeline's guidance (applied to the output, which the denoised
estimate is affine in) is guidance on the denoiser.

A calibration (``calibration=``: a file of ``steindiff calibrate-pipeline``, a :class:`~steindiff.plan.SamplingPlan`
or a :class:`~steindiff.stabilizers.schedule.GammaSchedule`) brings its noise levels, fed to the model as
fractional timesteps, and its per-step gammas (SteinDiff's rectified update with fixed ``gamma``), at the same
number of model passes as the plain solver.  A calibration made for another solver, schedule, step count,
resolution shift (``mu``), latent size, noise process, guidance scale or model is refused with a ValueError
naming the mismatch.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..models.denoisers import FlowDenoiser
from ..noise import FLOW_T_DELTA, FlowProcess, NoiseProcess
from ..plan import SamplingPlan
from ..sampling import steps as solve_steps
from ..schedules import SCHEDULES, get_sigmas, validate_sigmas
from ..solvers import Denoise, Solver, StepOperator, get_solver
from ..stabilizers.schedule import GammaSchedule
from ._calibration import as_plan, canonical_solver
from .diffusers import (
    DEFAULT_SOLVER,
    PREDICTION_TYPE_MAP,
    _config_of,
    _recorded_conditioning,
    _stderr_notice,
    denoiser_from_diffusers,
    is_flow_scheduler,
    process_from_scheduler,
)
from .diffusers_flow import (
    FlowSchedulerConfig,
    any_pipeline_model,
    encode_prompts,
    flow_scheduler_config,
    image_size,
    pipeline_schedule_kwargs,
)

__all__ = ["SteinDiffScheduler", "SteinDiffSchedulerOutput", "calibration_record", "calibrate_scheduler",
           "conditioning_free_model", "pipeline_plan"]

FLOW_SCHEDULES = ("flow", *(s for s in SCHEDULES if s != "flow"))
VP_SCHEDULES = tuple(s for s in SCHEDULES if s != "flow")  # 'flow' needs a FlowProcess
VP_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
             "rescale_betas_zero_snr")


@dataclass
class SteinDiffSchedulerOutput(BaseOutput):
    """``prev_sample``: the latents for the next model call (the pipeline's coordinates).  ``pred_original_sample``:
    the denoised estimate of this model call (the clean latents)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class _NeedsModel(Exception):
    """The step needs the model at ``x`` (VE) and ``sigma``: the pipeline is asked for it."""

    def __init__(self, x: torch.Tensor, sigma: float):
        super().__init__(f"model needed at sigma={sigma:.6g}")
        self.x, self.sigma = x, sigma


class _PipelineOutput:
    """The network of the scheduler's adapter: it returns the model output the pipeline gave (``output``)."""

    output: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: Any = None, **kw: Any) -> torch.Tensor:
        return self.output.to(device=x.device)


class _Replay:
    """The denoiser of one step as the solver calls it: the ``k``-th call gets the adapter applied to the
    pipeline's ``k``-th model output of this step; a call past those raises :class:`_NeedsModel`.  The step is a
    pure function of the model outputs, so running it again with one more output continues it exactly."""

    def __init__(self, adapter: Any, net: _PipelineOutput, outputs: list[torch.Tensor]):
        self.adapter, self.net, self.outputs, self.k = adapter, net, outputs, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.k >= len(self.outputs):
            raise _NeedsModel(x, float(sigma.reshape(-1)[0]))
        self.net.output = self.outputs[self.k]
        self.k += 1
        return self.adapter(x, sigma)


def _evaluation_layout(solver: Solver, sigmas: torch.Tensor) -> list[tuple[int, float]]:
    """``(step, sigma)`` of every model call of a solve over ``sigmas``, in order: a dry run of the sampling loop
    on a zero model (which calls a solver makes depends on the noise levels only)."""
    calls: list[tuple[int, float]] = []
    step = [0]

    def model(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        calls.append((step[0], float(s[0])))
        return torch.zeros_like(x)

    for ev in solve_steps(model, torch.zeros(1, 1, dtype=torch.float64), sigmas, solver, check_finite=False):
        step[0] = ev.i + 1
    return calls


def calibration_record(calibration: Any, *, solver: str | None = None) -> dict:
    """A calibration (a file path, :class:`SamplingPlan`, :class:`GammaSchedule` or such a record) as the plain
    dict the scheduler keeps in its config (saved with the pipeline): its solver, noise levels, gammas, the base
    noise levels it was fitted from, the model fingerprint, the guidance scale and the pipeline it was made for."""
    if isinstance(calibration, Mapping):
        rec = dict(calibration)
        missing = [k for k in ("solver", "sigmas") if k not in rec]
        if missing:
            raise ValueError(f"calibration record lacks {', '.join(missing)}")
        return rec
    if isinstance(calibration, os.PathLike):
        calibration = os.fspath(calibration)
    plan = as_plan(calibration, solver=solver or DEFAULT_SOLVER)
    meta = plan.meta
    cond = _recorded_conditioning(meta) or {}
    guidance = cond.get("embedded_guidance")
    if guidance is None:
        guidance = cond.get("guidance_scale")
    base = meta.get("base_sigmas")
    return {"solver": plan.solver, "solver_options": dict(plan.solver_options),
            "schedule": str(meta.get("schedule", plan.schedule)), "sigmas": [float(s) for s in plan.sigmas],
            "gammas": None if plan.gammas is None else [float(g) for g in plan.gammas], "coords": plan.coords,
            "base_sigmas": None if base is None else [float(s) for s in base], "fingerprint": meta.get("fingerprint"),
            "guidance_scale": None if guidance is None else float(guidance),
            "pipeline": dict(meta["pipeline"]) if isinstance(meta.get("pipeline"), Mapping) else None,
            "name": str(meta.get("name", "calibrated")), "timestep": cond.get("timestep"),
            "source": calibration if isinstance(calibration, str) else None}


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):.5g}" for v in values) + "]"


def base_mismatch(made: Mapping, recorded: Sequence[float] | torch.Tensor, here: torch.Tensor, mu: float | None,
                  here_size: str = "another image size", cause: str = "another schedule or step count") -> str | None:
    """Why a calibration fitted from the plain noise levels ``recorded`` is not this call's, whose plain levels
    are ``here`` (``None``: they match, to 1e-6).  The one check of :class:`SteinDiffScheduler` and
    ``sample_pipeline``: a flow calibration that records its resolution shift (``made["mu"]``, from
    ``pipeline_record``) is named by it when this call's ``mu`` is another; otherwise both level lists are named
    and ``cause`` says what differs."""
    rec = torch.as_tensor(recorded, dtype=torch.float64)
    if len(rec) == len(here) and torch.allclose(here, rec, rtol=1e-6, atol=1e-9):
        return None
    return mu_mismatch(made, mu, here_size) or \
        f"it was made from the noise levels {_fmt(rec)}, this call's are {_fmt(here)} ({cause})"


def mu_mismatch(made: Mapping, mu: float | None, here_size: str = "another image size") -> str | None:
    """The resolution shift a flow calibration records (``made["mu"]``) against this call's ``mu``: why they
    differ, else ``None`` (also when either is unknown)."""
    if made.get("mu") is None or mu is None or math.isclose(float(made["mu"]), float(mu), rel_tol=1e-6):
        return None
    where = f" ({made['height']}x{made['width']} pixels)" if made.get("height") else ""
    return (f"it was made for the resolution shift mu={float(made['mu']):.6g}{where}, this call's is "
            f"mu={float(mu):.6g} ({here_size})")


class SteinDiffScheduler(SchedulerMixin, ConfigMixin):
    """steindiff's solvers (and calibrated samplers) as a diffusers scheduler.

    Build it from the pipeline's own scheduler config: ``SteinDiffScheduler.from_config(pipe.scheduler.config,
    solver=..., calibration=...)``, or :meth:`from_pipeline` to also check a calibration's model fingerprint.

    ``solver``: any of :data:`steindiff.solvers.SOLVERS` (default: the calibration's, else ``dpmpp_2m``), with
    ``solver_options``.  ``schedule``: ``karras`` (``rho``), ``logsnr`` or ``time``; for flow models also
    ``flow``, diffusers' own flow schedule (the levels of the scheduler the config came from, shifted by ``shift``
    or ``mu``; the default there).  For flow models ``karras`` and ``logsnr`` span the range of the shifted flow
    levels (as diffusers' ``use_karras_sigmas``), so ``mu`` moves them too.  ``num_inference_steps`` is the number
    of solver steps; Heun evaluates the model ``2 n - 1`` times (``order`` 2), as diffusers' Heun scheduler.
    ``calibration``: a calibration file, plan or record (:func:`calibration_record`); ``guidance_scale``: the
    guidance scale the pipeline will be called with, required by a calibration made with guidance (checked
    against it; a scheduler cannot see the pipeline's guidance).

    The remaining fields are the pipeline's scheduler config, read by :meth:`from_config`: ``process`` (``vp`` or
    ``flow``), the VP betas (``num_train_timesteps``, ``beta_*``, ``trained_betas``, ``rescale_betas_zero_snr``)
    and ``prediction_type``, the flow shift (``shift``, ``use_dynamic_shifting``, ``base_shift``, ``max_shift``,
    ``base_image_seq_len``, ``max_image_seq_len``, ``time_shift_type``) and ``flow_grid``, whose levels the
    ``flow`` schedule steps (``euler``: ``FlowMatchEulerDiscreteScheduler``'s and ``FlowMatchHeunDiscreteScheduler``'s;
    ``dpm``, ``unipc``: ``DPMSolverMultistepScheduler``'s or ``UniPCMultistepScheduler``'s with ``use_flow_sigmas``,
    so that swapping one of those for this scheduler keeps the pipeline's levels).  ``timestep_type``: ``interp``
    (fractional timesteps, the default) or ``round`` (VP).  ``flow_t_max``: the flow time taken for diffusers'
    first level ``t = 1``, which has no VE noise level (default ``1 - FLOW_T_DELTA``, as everywhere in steindiff:
    :data:`steindiff.noise.FLOW_T_DELTA`).  ``state_dtype``: the solver state's dtype (``float64``;
    ``float32`` where the device has no float64).

    Latents: ``init_noise_sigma`` is 1 and ``scale_model_input`` returns its input: the pipeline's latents are
    what the model takes (VP ``x_vp``, flow ``x_t``).  ``add_noise`` (VP img2img) and ``scale_noise`` (flow
    img2img) noise clean latents to the first level of the solve; with a begin index (img2img) the solve starts
    at that step, its multistep history empty (as diffusers' multistep schedulers start).
    """

    _compatibles: list = []
    order = 1  # replaced per instance: model calls per solver step

    @register_to_config
    def __init__(
        self,
        solver: str | None = None,
        solver_options: dict | None = None,
        schedule: str | None = None,
        rho: float = 7.0,
        calibration: Any = None,
        guidance_scale: float | None = None,
        process: str = "vp",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str | None = None,
        timestep_type: str = "interp",
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        flow_grid: str = "euler",
        flow_t_max: float = 1.0 - FLOW_T_DELTA,
        state_dtype: str = "float64",
    ):
        if process not in ("vp", "flow"):
            raise ValueError(f"process must be 'vp' or 'flow', got {process!r}")
        if state_dtype not in ("float64", "float32"):
            raise ValueError(f"state_dtype must be 'float64' or 'float32', got {state_dtype!r}")
        self.flow: FlowSchedulerConfig | None = None
        if process == "flow":
            self.flow = flow_scheduler_config({
                "_class_name": "FlowMatchEulerDiscreteScheduler", "process": "flow", "flow_grid": flow_grid,
                "num_train_timesteps": num_train_timesteps,
                "shift": shift, "use_dynamic_shifting": use_dynamic_shifting, "base_shift": base_shift,
                "max_shift": max_shift, "base_image_seq_len": base_image_seq_len,
                "max_image_seq_len": max_image_seq_len, "time_shift_type": time_shift_type,
                "prediction_type": prediction_type})
            if not 0 < flow_t_max < 1:
                raise ValueError(f"flow_t_max must be in (0, 1), got {flow_t_max}")
            self.process: NoiseProcess = FlowProcess(1.0 / num_train_timesteps, flow_t_max)
            self._net = _PipelineOutput()
            self._adapter: Any = FlowDenoiser(self._net, self.process, "velocity", time_scale=num_train_timesteps)
        else:
            vp = {k: v for k, v in zip(VP_FIELDS, (num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                   trained_betas, rescale_betas_zero_snr))}
            vp["prediction_type"] = prediction_type or "epsilon"
            self.process = process_from_scheduler(vp)
            self._net = _PipelineOutput()
            self._adapter = denoiser_from_diffusers(self._net, vp, timestep=timestep_type)
        self.calibration_meta: dict | None = None  # the full metadata of a calibration given as a file or a plan
        if calibration is not None and not isinstance(calibration, Mapping):
            plan = as_plan(os.fspath(calibration) if isinstance(calibration, os.PathLike) else calibration,
                           solver=solver or DEFAULT_SOLVER)
            self.calibration_meta = dict(plan.meta)
            if isinstance(calibration, (str, os.PathLike)):
                self.calibration_meta.setdefault("source", os.fspath(calibration))
            calibration = plan
        self._cal = None if calibration is None else calibration_record(calibration, solver=solver)
        if self._cal is not None:
            self.register_to_config(calibration=self._cal)
            self._check_calibration(solver, solver_options, schedule, guidance_scale)
            solver = solver or self._cal["solver"]
            solver_options = self._cal.get("solver_options") or solver_options
            made = self._cal.get("schedule")
            ok = FLOW_SCHEDULES if self.flow is not None else VP_SCHEDULES
            schedule = schedule or (made if made in ok else None)
        self.solver_name = solver or DEFAULT_SOLVER
        self.solver = get_solver(self.solver_name, **(solver_options or {}))
        allowed = FLOW_SCHEDULES if self.flow is not None else VP_SCHEDULES
        self.schedule = schedule or ("flow" if self.flow is not None else "karras")
        if self.schedule not in allowed:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(allowed)} for a "
                             f"{'flow-matching' if self.flow is not None else 'VP'} scheduler config")
        self.order = self.solver.nfe([3.0, 2.0, 1.0]) // 2  # model calls per step (Heun: 2)
        self.init_noise_sigma = 1.0
        self.dtype = torch.float64 if state_dtype == "float64" else torch.float32
        self.plan: SamplingPlan | None = None
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._begin_index: int | None = None
        self._step_index: int | None = None

    # ------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """From any diffusers scheduler's config (or a scheduler): a VP config's betas and ``prediction_type``, or
        a flow-matching config's shift, read and checked here (a field we cannot represent exactly is refused,
        naming it); ``kwargs`` set this scheduler's own fields (``solver``, ``schedule``, ``calibration``, ...)."""
        if config is None:
            raise ValueError("from_config needs the pipeline's scheduler config")
        cfg, name = _config_of(config)
        if name != cls.__name__ and "process" not in kwargs:
            if is_flow_scheduler(config):
                flow = flow_scheduler_config(config)  # refuses what it cannot represent, naming the field
                cfg = {k: v for k, v in cfg.items() if k not in ("prediction_type", "shift")}
                fields = flow.as_dict()
                cfg.update(fields, flow_grid=fields.pop("grid"), process="flow", prediction_type="flow_prediction")
            else:
                if cfg.get("thresholding"):
                    raise ValueError(f"scheduler {name} sets thresholding=True (dynamic thresholding), which "
                                     "steindiff's solvers do not apply")
                pred = cfg.get("prediction_type", "epsilon")
                if pred not in PREDICTION_TYPE_MAP:
                    raise ValueError(f"scheduler {name} has prediction_type={pred!r}; supported: "
                                     f"{', '.join(PREDICTION_TYPE_MAP)}")
                process_from_scheduler(cfg)  # refuses a VE config or inconsistent tables, naming what is wrong
                cfg = {**cfg, "process": "vp", "prediction_type": pred}
            # every field read above is meant (defaults included); the source scheduler's other fields are its own
            keys = cls._get_init_keys(cls)
            cfg = {**{k: v for k, v in cfg.items() if k in keys}, "_use_default_values": []}
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> "SteinDiffScheduler":
        """:meth:`from_config` of ``pipe.scheduler``, and, with a calibration that records its model's fingerprint,
        a check that it was made for this pipeline's weights (ValueError naming both fingerprints)."""
        sched = cls.from_config(pipe.scheduler.config, **kwargs)
        sched.check_pipeline(pipe)
        return sched

    def check_pipeline(self, pipe: Any) -> None:
        """Refuse a calibration made for another model than ``pipe``'s (by the fingerprint it records)."""
        rec = self._cal
        if rec is None or not rec.get("fingerprint") or not rec.get("pipeline"):
            return
        from ..calibration import model_fingerprint

        here = model_fingerprint(conditioning_free_model(pipe, rec).spec())
        if here != rec["fingerprint"]:
            raise ValueError(f"calibration was made for another model: its fingerprint is {rec['fingerprint']}, this "
                             f"pipeline's ({type(pipe).__name__}: weights, latent shape, noise process) is {here}")

    def save_calibration(self, path: str | os.PathLike) -> None:
        """Write the calibration in use as a calibration file (``steindiff.gamma-schedule/1``, atomically): what
        ``calibration=`` takes back, and what :func:`steindiff.integrations.export.export_calibration`,
        ``sample_pipeline(calibration=...)`` and the k-diffusion functions read."""
        rec = self._cal
        if rec is None:
            raise ValueError("this scheduler has no calibration to save")
        sig = torch.as_tensor(rec["sigmas"], dtype=torch.float64)
        meta = {k: v for k, v in (self.calibration_meta or {}).items() if k != "source"}
        meta.update(model=meta.get("model", "diffusers"), solver=rec["solver"], schedule=rec["schedule"],
                    nfe=get_solver(rec["solver"], **(rec.get("solver_options") or {})).nfe(sig),
                    sigmas=rec["sigmas"], base_sigmas=rec.get("base_sigmas"), fingerprint=rec.get("fingerprint"),
                    pipeline=rec.get("pipeline"), name=rec.get("name", "calibrated"))
        gammas = rec.get("gammas") or [1.0] * (len(sig) - 1)
        GammaSchedule(gammas, rec.get("coords", "ve"), meta).save(path)

    def _check_calibration(self, solver: str | None, solver_options: dict | None, schedule: str | None,
                           guidance_scale: float | None) -> None:
        rec, bad = self._cal, []
        if solver is not None and canonical_solver(solver, solver_options) != canonical_solver(
                rec["solver"], rec.get("solver_options")):
            bad.append(f"it was made for solver {rec['solver']!r}, this scheduler is configured with {solver!r}")
        if schedule is not None and rec.get("schedule") not in (None, "custom", schedule):
            bad.append(f"it was made for the {rec['schedule']!r} schedule, this scheduler is configured with "
                       f"{schedule!r}")
        g = rec.get("guidance_scale")
        if g is not None and guidance_scale is None and g != 1.0:
            bad.append(f"it was made for guidance scale {g:g}: pass guidance_scale={g:g} to the scheduler (and the "
                       "same to the pipeline)")
        elif g is not None and guidance_scale is not None and float(guidance_scale) != g:
            bad.append(f"it was made for guidance scale {g:g}, the scheduler is told {float(guidance_scale):g}")
        if self.flow is None and rec.get("timestep") not in (None, self.config.timestep_type):
            bad.append(f"it was made with {rec['timestep']!r} timesteps, this scheduler uses "
                       f"timestep_type={self.config.timestep_type!r}")
        made = rec.get("pipeline") or {}
        if made.get("process") and made["process"] != repr(self.process):
            bad.append(f"it was made for the noise process {made['process']}, this scheduler config gives "
                       f"{self.process!r}")
        if self.flow is not None and isinstance(made.get("scheduler"), Mapping):
            here = self.flow.as_dict()
            dynamic = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
            for k, v in made["scheduler"].items():
                if k in here and here[k] != v and not (k in dynamic and not self.flow.use_dynamic_shifting):
                    bad.append(f"it was made for a scheduler config with {k}={v!r}, this one has {k}={here[k]!r}")
        if bad:
            raise ValueError("calibration does not match this scheduler: " + "; ".join(bad))

    # ------------------------------------------------------------------------------------------------
    # noise levels
    # ------------------------------------------------------------------------------------------------
    @property
    def calibration(self) -> dict | None:
        """The calibration record in use (``None``: the plain solver)."""
        return self._cal

    def _flow_levels(self, n: int | None, sigmas: Any, timesteps: Any, mu: float | None) -> torch.Tensor:
        """Flow times (float64, without the final 0) as ``FlowMatchEulerDiscreteScheduler.set_timesteps`` makes
        them: the pipeline's ``sigmas`` shifted, else ``timesteps / num_train_timesteps`` as given, else the
        default levels, shifted; times above ``flow_t_max`` (diffusers' ``t = 1``) are taken at ``flow_t_max``."""
        flow = self.flow
        if sigmas is not None:
            t = flow.schedule(mu).shifted(torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1))
        elif timesteps is not None:
            t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1) / flow.num_train_timesteps
        else:
            t = flow.schedule(mu).times(int(n))
        if not bool(((t > 0) & (t <= 1)).all()):
            raise ValueError(f"flow times must be in (0, 1], got {_fmt(t)}")
        return t.clamp(max=self.process.t_max)

    def plan_for(self, num_inference_steps: int | None = None, *, sigmas: Any = None, timesteps: Any = None,
                 mu: float | None = None) -> SamplingPlan:
        """The plain plan of a ``set_timesteps`` call: this scheduler's solver over ``num_inference_steps`` steps of
        its schedule (VP: ``sigmas`` are VE noise levels, ``timesteps`` model times, either used as given; flow:
        see the class docstring).  A calibration is fitted from, and checked against, this plan."""
        if sigmas is not None and timesteps is not None:
            raise ValueError("pass sigmas or timesteps, not both")
        given = sigmas if sigmas is not None else timesteps
        if given is not None and num_inference_steps is not None:
            count = len(given) - (1 if (self.flow is None and sigmas is not None and float(given[-1]) == 0) else 0)
            if count != int(num_inference_steps):
                raise ValueError(f"{'sigmas' if sigmas is not None else 'timesteps'} has {count} levels but "
                                 f"num_inference_steps is {num_inference_steps}")
        if given is None and (num_inference_steps is None or int(num_inference_steps) < 1):
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        opts = dict(self._cal.get("solver_options") or {}) if self._cal else dict(self.config.solver_options or {})
        if self.flow is not None:
            ve = FlowProcess.t_to_sigma(self._flow_levels(num_inference_steps, sigmas, timesteps, mu))
            if self.schedule == "flow" or len(ve) < 2:
                s, name = torch.cat([ve, ve.new_zeros(1)]), "flow"
            else:
                s = get_sigmas(self.schedule, len(ve), self.process, sigma_min=float(ve[-1]), sigma_max=float(ve[0]),
                               rho=self.config.rho)
                name = self.schedule
        elif sigmas is not None:
            s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
            s, name = (s if float(s[-1]) == 0 else torch.cat([s, s.new_zeros(1)])), "custom"
        elif timesteps is not None:
            s = self.process.t_to_sigma(torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1))
            s, name = torch.cat([s, s.new_zeros(1)]), "custom"
        else:
            s = get_sigmas(self.schedule, int(num_inference_steps), self.process, rho=self.config.rho)
            name = self.schedule
        return SamplingPlan(self.solver_name, validate_sigmas(s), name, solver_options=opts)

    def _calibrated(self, base: SamplingPlan, mu: float | None) -> SamplingPlan:
        """The calibration's plan, refused (naming the mismatch) unless it was fitted from ``base``."""
        rec = self._cal
        sig = torch.as_tensor(rec["sigmas"], dtype=torch.float64)
        bad = []
        recorded = rec.get("base_sigmas")
        if len(sig) != len(base.sigmas):
            bad.append(f"it has {len(sig) - 1} steps, this call asks for {base.steps} (num_inference_steps)")
        elif recorded is not None and len(recorded) == len(sig):
            dynamic = self.flow is not None and self.flow.use_dynamic_shifting
            why = base_mismatch(rec.get("pipeline") or {}, recorded, base.sigmas, mu if dynamic else None,
                                cause="another schedule, shift, flow grid or step count")
            bad += [why] if why else []
        elif not math.isclose(float(base.sigmas[0]), float(sig[0]), rel_tol=1e-6):  # a file without base_sigmas
            bad.append(f"it was made from the noise levels {_fmt(sig[:1])}, this call's are {_fmt(base.sigmas)} "
                       "(another schedule, shift, flow grid or step count)")
        if bad:
            raise ValueError("calibration does not match this pipeline call: " + "; ".join(bad))
        return SamplingPlan(rec["solver"], sig, "fitted", rec.get("gammas"), rec.get("coords", "ve"),
                            dict(rec.get("solver_options") or {}), {"name": rec.get("name", "calibrated"),
                                                                     "base_sigmas": rec.get("base_sigmas")})

    def model_time(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The timestep the pipeline passes its model at VE noise level ``sigma`` (float64): VP the fractional
        (``interp``) or rounded table timestep; flow ``t * num_train_timesteps``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        if self.flow is not None:
            return FlowProcess.sigma_to_t(sigma) * self.flow.num_train_timesteps
        return self._adapter.sigma_to_t(sigma)

    def level(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """VE noise level ``sigma`` in the pipeline's convention (``sigmas`` attribute): VP the VE level itself (as
        diffusers' Euler schedulers), flow the time ``t = sigma / (1 + sigma)``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return FlowProcess.sigma_to_t(sigma) if self.flow is not None else sigma

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: Any = None, mu: float | None = None, timesteps: Any = None) -> None:
        """The noise levels of a pipeline call: the plain plan of :meth:`plan_for`, or the calibration fitted from
        it (refused when it was fitted from another one).  ``timesteps`` holds one model time per model call
        (Heun: ``2 n - 1``), ``sigmas`` the levels of those calls and a final 0 (flow: times ``t``)."""
        base = self.plan_for(num_inference_steps, sigmas=sigmas, timesteps=timesteps, mu=mu)
        plan = self._calibrated(base, mu) if self._cal is not None else base
        layout = _evaluation_layout(plan.get_solver(), plan.sigmas)
        self.plan, self._layout, self._mu = plan, layout, mu
        eval_sigmas = torch.tensor([s for _, s in layout], dtype=torch.float64)
        self.timesteps = self.model_time(eval_sigmas).to(device=device, dtype=torch.float32)
        self.sigmas = torch.cat([self.level(eval_sigmas), torch.zeros(1, dtype=torch.float64)]).to(
            device=device, dtype=torch.float32)
        self.num_inference_steps = plan.steps
        self.nfe = len(layout)
        self._begin_index = self._step_index = None
        self._run = None

    # ------------------------------------------------------------------------------------------------
    # the pipeline's loop
    # ------------------------------------------------------------------------------------------------
    @property
    def begin_index(self) -> int | None:
        """The first model call of the run (set by img2img pipelines through :meth:`set_begin_index`)."""
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        """The index in ``timesteps`` of the next model call (``None`` before the first ``step``)."""
        return self._step_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep: Any, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The model call of ``timestep`` (the second of two equal ones, as diffusers' schedulers pick it, so that
        a run started from a level Heun evaluates twice starts at a step)."""
        ts = self.timesteps if schedule_timesteps is None else schedule_timesteps
        t = torch.as_tensor(timestep, dtype=torch.float32, device=ts.device).reshape(-1)[0]
        hits = torch.nonzero(torch.isclose(ts.float(), t, rtol=1e-6, atol=1e-4)).reshape(-1)
        if len(hits) == 0:
            raise ValueError(f"timestep {float(t):.6g} is not one of this scheduler's timesteps {_fmt(ts)}")
        return int(hits[1 if len(hits) > 1 else 0])

    def _start(self, timestep: Any) -> None:
        """Begin the run at the model call given by the begin index or the first timestep: the solve over the
        plan's levels from that call's step on (its multistep history empty)."""
        if self.plan is None:
            raise ValueError("call set_timesteps before step")
        e = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        if not 0 <= e < len(self._layout):
            raise ValueError(f"begin index {e} is outside the {len(self._layout)} model calls of this schedule")
        i0 = self._layout[e][0]
        if e > 0 and self._layout[e - 1][0] == i0:
            raise ValueError(f"the run cannot start at model call {e}: it is the second call of step {i0} "
                             f"({self.solver_name} evaluates the model {self.order} times per step)")
        plan = self.plan
        sig = plan.sigmas[i0:]
        gammas = None if plan.gammas is None else plan.gammas[i0:]
        stab = None
        if gammas is not None and any(g != 1.0 for g in gammas):
            stab = GammaSchedule(gammas, plan.coords, {"name": plan.meta.get("name", "calibrated")})
        self._run = {"sigmas": [float(s) for s in sig], "i": 0, "state": self.solver.init_state(), "x": None,
                     "outputs": [], "stabilizer": stab, "offset": i0}
        self._step_index = e

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The pipeline's latents are the model's input: returned as they are."""
        return sample

    def _check_shape(self, sample: torch.Tensor) -> None:
        made = (self._cal or {}).get("pipeline") or {}
        shape = made.get("sample_shape")
        if shape is not None and tuple(sample.shape[1:]) != tuple(shape):
            raise ValueError(f"calibration does not match this pipeline call: it was made for latents of shape "
                             f"{tuple(shape)} ({made.get('height')}x{made.get('width')} pixels), this call's are "
                             f"{tuple(sample.shape[1:])} (another resolution)")

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, eta: float = 0.0,
             generator: Any = None, return_dict: bool = True, **kwargs: Any) -> SteinDiffSchedulerOutput | tuple:
        """One model call's worth of the solve: the model output at ``sample`` (the latents the pipeline gave the
        model) goes to the solver's step; returns the latents of the next model call (the step's result, or the
        point where the step evaluates the model again).  ``eta`` must be 0: the solvers are deterministic."""
        if eta not in (0, 0.0, None):
            raise ValueError(f"eta={eta!r} is not supported: steindiff's solvers are deterministic (ODE) solvers")
        stochastic = {k: v for k, v in kwargs.items() if k == "s_churn" and v not in (0, 0.0)}
        if stochastic:
            raise ValueError(f"{', '.join(stochastic)} is not supported: steindiff's solvers are deterministic")
        if self._run is None:
            self._start(timestep)
            self._check_shape(sample)
        run, e = self._run, self._step_index
        if e >= len(self._layout):
            raise ValueError(f"step() was called {e + 1} times but this schedule has {len(self._layout)} model calls")
        want = float(self.timesteps[e])
        got = float(torch.as_tensor(timestep).reshape(-1)[0])
        if not math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-3):
            raise ValueError(f"step() got timestep {got:.6g} but model call {e} of this schedule is at {want:.6g}")
        sigmas, i = run["sigmas"], run["i"]
        if run["x"] is None:  # the first model call of a step: the step starts from the pipeline's latents
            run["x"] = self.process.to_ve(sample.to(self.dtype), sigmas[i])
        run["outputs"].append(model_output)
        op = StepOperator(self.solver, Denoise(_Replay(self._adapter, self._net, run["outputs"])), i, sigmas,
                          run["state"])
        x = run["x"]
        try:
            with torch.no_grad():
                if run["stabilizer"] is None:
                    st = op(x)
                    x_next = st.x_next
                else:
                    x_next, st, _ = run["stabilizer"].step(op, x)
        except _NeedsModel as need:  # the step evaluates the model again (Heun's corrector)
            x_next, sigma_next, denoised = need.x, need.sigma, None
        else:
            sigma_next, denoised = sigmas[i + 1], st.denoised
            run.update(i=i + 1, state=st.state, x=None, outputs=[])
        expect = self._layout[e + 1][1] if e + 1 < len(self._layout) else 0.0
        # the level a corrector asks the model at comes back in the state's dtype (float32: ~6e-8 relative)
        tol = 1e-9 if self.dtype == torch.float64 else 1e-6
        if not math.isclose(sigma_next, expect, rel_tol=tol, abs_tol=1e-12):
            raise RuntimeError(f"internal: the solve reached sigma {sigma_next:.6g}, its layout says {expect:.6g}")
        self._step_index = e + 1
        prev = self.process.to_vp(x_next, sigma_next).to(sample.dtype)
        pred = None if denoised is None else denoised.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return SteinDiffSchedulerOutput(prev_sample=prev, pred_original_sample=pred)

    def _sigma_of(self, timesteps: Any, n: int, device: torch.device) -> torch.Tensor:
        """The VE level of the noising timestep(s), per sample: the begin index's (or the current step's) level
        when set, else each timestep's, as diffusers' schedulers choose it."""
        if self.plan is None:
            raise ValueError("call set_timesteps before adding noise")
        if self._step_index is not None:
            idx = [self._step_index] * n
        elif self._begin_index is not None:
            idx = [self._begin_index] * n
        else:
            ts = torch.as_tensor(timesteps).reshape(-1)
            idx = [self.index_for_timestep(t) for t in (ts.expand(n) if ts.numel() == 1 else ts)]
        levels = torch.tensor([s for _, s in self._layout] + [0.0], dtype=torch.float64)
        return levels[idx].to(device)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        """Clean latents noised to the level of ``timesteps`` (VP img2img): ``alpha (x0 + sigma noise)``, i.e.
        ``x_vp = alpha x0 + sigma_vp noise``; for flow ``(1 - t) x0 + t noise``."""
        x0 = original_samples
        s = self._sigma_of(timesteps, x0.shape[0], x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
        x_ve = x0.to(self.dtype) + s.to(self.dtype) * noise.to(self.dtype)
        return (x_ve * self.process.alpha(s).to(device=x0.device, dtype=self.dtype)).to(x0.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``FlowMatchEulerDiscreteScheduler.scale_noise``: ``(1 - t) sample + t noise`` at the level of ``timestep``
        (flow img2img); :meth:`add_noise` with its arguments in this order."""
        if noise is None:
            raise ValueError("scale_noise needs the noise")
        return self.add_noise(sample, noise, timestep)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)


# ----------------------------------------------------------------------------------------------------
# calibrating a pipeline
# ----------------------------------------------------------------------------------------------------
def _pipeline_record(pipe: Any, sched: SteinDiffScheduler, pm: Any, height: int, width: int, mu: float | None,
                     guidance_scale: float) -> dict:
    """What a calibration records of the pipeline call it was made for (checked by the scheduler)."""
    if sched.flow is not None:
        scheduler = sched.flow.as_dict()
    else:
        scheduler = {k: sched.config[k] for k in VP_FIELDS}
    return {"class": type(pipe).__name__, "height": int(height), "width": int(width), "mu": mu,
            "sample_shape": [int(s) for s in pm.sample_shape], "process": repr(pm.process), "scheduler": scheduler,
            "guidance_scale": float(guidance_scale), "num_inference_steps": None}


def pipeline_plan(pipe: Any, num_inference_steps: int, *, solver: str = DEFAULT_SOLVER, schedule: str | None = None,
                  rho: float = 7.0, solver_options: dict | None = None, height: int | None = None,
                  width: int | None = None) -> tuple[SteinDiffScheduler, SamplingPlan, float | None]:
    """The plain plan a :class:`SteinDiffScheduler` built from ``pipe``'s scheduler config (without a calibration)
    steps a pipeline call of ``num_inference_steps`` at ``height x width`` pixels (default :func:`image_size`) with:
    :meth:`SteinDiffScheduler.plan_for` of what the pipeline passes ``set_timesteps`` (flow: its ``mu`` and, for
    FLUX, its sigmas; :func:`pipeline_schedule_kwargs`).  Returns the scheduler, the plan and that ``mu``."""
    sched = SteinDiffScheduler.from_config(pipe.scheduler.config, solver=solver, schedule=schedule, rho=rho,
                                           solver_options=solver_options, calibration=None, guidance_scale=None)
    height, width = image_size(pipe, height, width)
    kwargs = pipeline_schedule_kwargs(pipe, num_inference_steps, height, width) if sched.flow is not None else {}
    base = sched.plan_for(None if "sigmas" in kwargs else num_inference_steps, **kwargs)
    return sched, base, kwargs.get("mu")


def conditioning_free_model(pipe: Any, rec: Mapping) -> Any:
    """The model a calibration record was fitted on, rebuilt with placeholder conditioning: its weights, latent
    shape and process make the same :func:`~steindiff.calibration.model_fingerprint` (conditioning is not part of
    it), so a calibration can be checked against a pipeline."""
    made = rec["pipeline"]
    g = float(made.get("guidance_scale", rec.get("guidance_scale") or 1.0))
    z = torch.zeros(1, 1, 1)
    embeds = {"prompt_embeds": z, "negative_prompt_embeds": z, "pooled_prompt_embeds": z[0],
              "negative_pooled_prompt_embeds": z[0]}
    if getattr(pipe, "transformer", None) is None:
        embeds = {k: embeds[k] for k in ("prompt_embeds", "negative_prompt_embeds")}
    t_max = 1.0 - FLOW_T_DELTA
    if getattr(pipe, "transformer", None) is not None and made.get("process", "").startswith("FlowProcess"):
        t_max = float(re.search(r"t_max=([-+0-9.eE]+)", made["process"]).group(1))
    return any_pipeline_model(pipe, guidance_scale=g, height=made.get("height"), width=made.get("width"), t_max=t_max,
                              **embeds)


def calibrate_scheduler(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    *,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    negative_prompt: str = "",
    embeddings: Mapping[str, torch.Tensor] | None = None,
    height: int | None = None,
    width: int | None = None,
    solver: str = DEFAULT_SOLVER,
    schedule: str | None = None,
    rho: float = 7.0,
    solver_options: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    calibrate_missing: bool = True,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    notice: Any = _stderr_notice,
    **options: Any,
) -> SteinDiffScheduler:
    """Calibrate ``solver`` for a pipeline call (prompts, guidance scale, image size, step count) once, and return the
    :class:`SteinDiffScheduler` that applies it: ``pipe.scheduler = calibrate_scheduler(pipe, prompts, ...)``.

    The model is the pipeline's denoiser as the pipeline calls it (:func:`~.diffusers_flow.any_pipeline_model`:
    classifier-free guidance at ``guidance_scale`` for Stable Diffusion and SD3, embedded guidance for FLUX) over the
    pipeline's own encoding of ``prompts`` (or ``embeddings``, the keyword arguments of
    :func:`~.diffusers_flow.encode_prompts`).  The plain plan it refines is the scheduler's for this call
    (:func:`pipeline_plan`: :meth:`SteinDiffScheduler.plan_for` with what the pipeline passes ``set_timesteps`` at
    ``height x width``: its ``mu`` and, for FLUX, its sigmas).  The calibrated sampler of
    :func:`steindiff.calibration.calibrated_plan`
    (through :func:`~steindiff.integrations.diffusers.calibrate_pipeline`'s cache, keyed by the weights, the latent
    shape, the process, the plan and the conditioning: the guidance scale and a hash of the embeddings) fits it on
    first use; ``options`` go to :func:`steindiff.calibration.calibrate` (``n``, ``ref_steps``, ``max_solves``,
    ``max_seconds``, ``seed``, ``fit``).  With ``calibrate_missing=False`` and nothing cached, the plain scheduler.
    """
    from .diffusers import _calibrated

    if prompts is None and embeddings is None:
        raise ValueError("give prompts (encoded by the pipeline) or embeddings")
    sched, base, mu = pipeline_plan(pipe, num_inference_steps, solver=solver, schedule=schedule, rho=rho,
                                    solver_options=solver_options, height=height, width=width)
    height, width = image_size(pipe, height, width)
    embeds = dict(embeddings) if embeddings is not None else encode_prompts(
        pipe, prompts, negative_prompt=negative_prompt, guidance_scale=guidance_scale)
    pm = any_pipeline_model(pipe, guidance_scale=guidance_scale, height=height, width=width,
                            **({"t_max": sched.process.t_max} if sched.flow is not None else {}), **embeds)
    if repr(pm.process) != repr(sched.process):
        raise RuntimeError(f"internal: the pipeline model's process {pm.process!r} is not the scheduler's "
                           f"{sched.process!r}")
    plan = _calibrated(pm, base, cache_dir=cache_dir, calibrate_missing=calibrate_missing, dtype=dtype,
                       progress=progress, notice=notice, options=options)
    if plan.gammas is None:  # nothing cached and not calibrating: the plain scheduler
        return sched
    plan.meta["pipeline"] = {**_pipeline_record(pipe, sched, pm, height, width, mu, guidance_scale),
                             "num_inference_steps": int(num_inference_steps)}
    g = pm.conditioning().get("embedded_guidance") or pm.guidance_scale
    return SteinDiffScheduler.from_config(pipe.scheduler.config, solver=solver, schedule=sched.schedule, rho=rho,
                                          solver_options=solver_options, calibration=plan, guidance_scale=float(g))
