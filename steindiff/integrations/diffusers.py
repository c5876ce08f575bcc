"""diffusers models and pipelines with steindiff solvers and stabilizers.

- :func:`denoiser_from_diffusers`: a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``) or flow
  transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``) and its scheduler (or scheduler config)
  to a VE denoiser ``D(x, sigma, **extra)``: :class:`~steindiff.models.VPDenoiser` on a
  :class:`~steindiff.noise.DiscreteVPProcess` built from the scheduler's betas, or
  :class:`~steindiff.models.FlowDenoiser` on a :class:`~steindiff.noise.FlowProcess` for flow-matching
  schedulers (:func:`process_from_scheduler`).  Extra arguments (``encoder_hidden_states``,
  ``class_labels``, ``pooled_projections``, ...) go to the network.
- :class:`CFGDenoiser`: classifier-free guidance in VE coordinates,
  ``D = D_u + s (D_c - D_u)``, conditional and unconditional halves in one batched call.
- :func:`calibrate_pipeline`: the calibrated sampler (:mod:`steindiff.calibration`) for a UNet
  pipeline, over the user's prompt embeddings (or class labels) and guidance scale, cached by the
  UNet's weights and that conditioning.  :func:`pipeline_model` builds the model it fits, which
  :func:`~.diffusers_pipeline.sample_pipeline` samples.

Schedulers: VP (DDPM-family) ones, DDPM, DDIM, PNDM, Euler, Heun, DPM-Solver, UniPC, ... with
``prediction_type`` ``epsilon``, ``v_prediction`` or ``sample``; and flow-matching ones,
``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``, and DPM-Solver or UniPC with
``use_flow_sigmas=True``.  VE schedulers, and settings of a flow scheduler that no steindiff schedule
reproduces, are refused with a ValueError naming the field.  :func:`~.diffusers_pipeline.sample_pipeline` takes
UNet pipelines and the flow pipelines of SD3 and FLUX (:mod:`.diffusers_flow`); :func:`calibrate_pipeline` takes
UNet pipelines (flow pipelines: ``stabilizer="auto"`` in ``sample_pipeline``, or
:func:`.diffusers_scheduler.calibrate_scheduler`).
"""

from __future__ import annotations

import json
import numbers
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..calibration import calibrated_plan, conditioning_digest
from ..models.denoisers import FlowDenoiser, VPDenoiser
from ..models.registry import ModelSpec
from ..noise import (
    FLOW_T_DELTA,
    DiscreteVPProcess,
    FlowProcess,
    NoiseProcess,
    betas_for_schedule,
    zero_snr_alphas_cumprod,
)
from ..plan import SamplingPlan, make_plan
from ..schedules import FLOW_SHIFT_TYPES, FlowSchedule, flow_shift_mu

__all__ = ["denoiser_from_diffusers", "process_from_scheduler", "is_flow_scheduler", "flow_time_scale", "CFGDenoiser",
           "PREDICTION_TYPE_MAP", "pipeline_model", "PipelineModel", "calibrate_pipeline", "UNCOND_PREFIX"]

#: diffusers ``prediction_type`` -> :class:`VPDenoiser` prediction
PREDICTION_TYPE_MAP = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
OUTPUT_TYPES = ("latent", "pt", "np", "pil")
DEFAULT_SOLVER, DEFAULT_NFE, DEFAULT_SCHEDULE = "dpmpp_2m", 10, "karras"
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "DPMSolverMultistepScheduler",
                   "UniPCMultistepScheduler")


def _config_of(scheduler_or_config: Any) -> tuple[dict, str]:
    """``(config dict, class name)`` of a scheduler or a config mapping."""
    if isinstance(scheduler_or_config, Mapping):
        cfg = dict(scheduler_or_config)
        return cfg, str(cfg.get("_class_name", "") or "")
    cfg = getattr(scheduler_or_config, "config", None)
    if not isinstance(cfg, Mapping):
        raise TypeError("expected a diffusers scheduler or its config (a mapping), got "
                        f"{type(scheduler_or_config).__name__}")
    return dict(cfg), type(scheduler_or_config).__name__


def is_flow_scheduler(scheduler_or_config: Any) -> bool:
    """Whether a diffusers scheduler (or config) is a flow-matching one: a ``FlowMatch*`` class,
    ``use_flow_sigmas=True``, ``prediction_type="flow_prediction"`` or a ``shift`` without betas."""
    cfg, cls = _config_of(scheduler_or_config)
    return ("FlowMatch" in cls or bool(cfg.get("use_flow_sigmas")) or cfg.get("prediction_type") == "flow_prediction"
            or ("shift" in cfg and "beta_schedule" not in cfg and cfg.get("trained_betas") is None))


def _refuse(cls: str, field: str, value: Any, why: str) -> None:
    raise ValueError(f"{cls or 'flow scheduler config'}: {field}={value!r} is not supported: {why}")


#: Settings of a flow-matching scheduler config that no steindiff schedule reproduces: refused, naming the field,
#: when set.  With ``use_flow_sigmas`` the multistep schedulers' spacings (:data:`FLOW_SIGMAS_REFUSED`) too.
FLOW_REFUSED = {
    "stochastic_sampling": "it re-noises each step (an SDE sampler), not a probability-flow ODE solve",
    "invert_sigmas": "it runs the schedule backwards (Mochi), not a probability-flow ODE solve",
    "thresholding": "dynamic thresholding changes the model's prediction",
}
FLOW_SIGMAS_REFUSED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
#: The fields (and diffusers' defaults) that give a dynamic shift's ``mu`` for an image size (``calculate_shift``).
FLOW_RESOLUTION_FIELDS = {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _flow_schedule(cfg: Mapping, cls: str) -> tuple[FlowSchedule, dict]:
    """The reading of a flow-matching scheduler config, for every part of steindiff that reads one: its
    :class:`~steindiff.schedules.FlowSchedule` (``mu`` not set) and its :data:`FLOW_RESOLUTION_FIELDS`.  Refuses
    (ValueError naming the field) what no steindiff schedule reproduces (see :func:`process_from_scheduler`)."""
    name = cls or "flow scheduler config"
    if "FlowMatch" in cls and cls not in FLOW_SCHEDULERS:
        raise ValueError(f"flow-matching scheduler {cls} is not supported: steindiff reads the configs of "
                         f"{', '.join(FLOW_SCHEDULERS[:2])}, and of DPMSolverMultistepScheduler and "
                         "UniPCMultistepScheduler with use_flow_sigmas=True")
    multistep = cls in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler") or (
        not cls and bool(cfg.get("use_flow_sigmas")))
    if not multistep and "FlowMatch" not in cls and (cls or "beta_schedule" in cfg):
        _refuse(name, "prediction_type", cfg.get("prediction_type"), "a flow model is sampled with "
                f"{', '.join(FLOW_SCHEDULERS[:2])}, or DPMSolverMultistepScheduler or UniPCMultistepScheduler with "
                "use_flow_sigmas=True")
    if multistep and not cfg.get("use_flow_sigmas"):
        _refuse(name, "use_flow_sigmas", cfg.get("use_flow_sigmas"), "a flow model (prediction_type="
                "'flow_prediction') needs the flow sigmas of use_flow_sigmas=True")
    pred = cfg.get("prediction_type", "flow_prediction" if multistep else None)
    if pred not in ((None, "flow_prediction") if not multistep else ("flow_prediction",)):
        _refuse(name, "prediction_type", pred, "a flow scheduler's model predicts the velocity "
                "(prediction_type='flow_prediction')")
    for setting, why in FLOW_REFUSED.items():
        if cfg.get(setting):
            _refuse(name, setting, cfg[setting], why)
    grid, spacing = "euler", [k for k in ("karras", "exponential", "beta") if cfg.get(f"use_{k}_sigmas")]
    if multistep:
        grid = "dpm" if "DPM" in cls or "algorithm_type" in cfg else "unipc"
        for setting in FLOW_SIGMAS_REFUSED:
            if cfg.get(setting):
                _refuse(name, setting, cfg[setting], "with use_flow_sigmas the multistep schedulers build these levels "
                        "from their VP beta table, which a flow model was not trained on")
        if cfg.get("final_sigmas_type", "zero") != "zero":
            _refuse(name, "final_sigmas_type", cfg["final_sigmas_type"], "the flow schedule ends at t = 0 "
                    "('zero'); 'sigma_min' repeats or replaces its last level")
        if grid == "dpm" and cfg.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
            _refuse(name, "algorithm_type", cfg["algorithm_type"], "steindiff's dpmpp_2m/3m are the deterministic "
                    "data-prediction DPM-Solver++ ('dpmsolver++')")
    if len(spacing) > 1:
        raise ValueError(f"{name}: only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be "
                         "set (diffusers refuses it too)")
    dynamic = bool(cfg.get("use_dynamic_shifting"))
    kind = cfg.get("time_shift_type", "exponential")
    if kind not in FLOW_SHIFT_TYPES:
        _refuse(name, "time_shift_type", kind,
                f"diffusers' time shifts are {' and '.join(map(repr, FLOW_SHIFT_TYPES))}")
    key = "flow_shift" if multistep else "shift"
    shift = cfg.get(key, 1.0)
    if shift is None and dynamic:  # unused: mu shifts instead
        shift = 1.0
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not shift > 0:
        _refuse(name, key, shift, "the shift must be a number > 0")
    n = cfg.get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or n != int(n) or n < 2:
        _refuse(name, "num_train_timesteps", n, "the training table needs a whole number of timesteps, at least 2")
    term = cfg.get("shift_terminal")
    schedule = FlowSchedule(shift=float(shift), dynamic=dynamic, shift_type=kind,
                            shift_terminal=float(term) if term else None, grid=grid,
                            spacing=spacing[0] if not multistep and spacing else None,
                            num_train_timesteps=int(n))
    resolution = {k: type(v)(cfg[k]) if cfg.get(k) is not None else v for k, v in FLOW_RESOLUTION_FIELDS.items()}
    return schedule, resolution


def _flow_process(cfg: dict, cls: str, mu: float | None, image_seq_len: int | None,
                  t_max: float | None) -> FlowProcess:
    """:func:`process_from_scheduler` of a flow-matching scheduler (see there)."""
    schedule, resolution = _flow_schedule(cfg, cls)
    name = cls or "flow scheduler config"
    if mu is not None and image_seq_len is not None:
        raise ValueError("pass mu or image_seq_len, not both")
    if image_seq_len is not None:
        if not schedule.dynamic:
            raise ValueError(f"image_seq_len={image_seq_len} was given but {name} does not set use_dynamic_shifting: "
                             "its shift does not depend on the image size")
        mu = flow_shift_mu(int(image_seq_len), **resolution)
    if mu is not None and not schedule.dynamic:
        raise ValueError(f"mu={mu} was given but {name} does not set use_dynamic_shifting: its shift is the static "
                         f"{'shift' if schedule.grid == 'euler' else 'flow_shift'}={schedule.shift:g}")
    if mu is not None:
        schedule = replace(schedule, mu=float(mu))
    delta = FLOW_T_DELTA if t_max is None else 1.0 - float(t_max)
    return FlowProcess(1.0 / schedule.num_train_timesteps, 1.0 - delta, schedule)


def process_from_scheduler(scheduler_or_config: Any, *, mu: float | None = None, image_seq_len: int | None = None,
                           t_max: float | None = None) -> NoiseProcess:
    """The noise process of a diffusers scheduler or its config: a :class:`~steindiff.noise.DiscreteVPProcess`
    (float64 ``alphas_cumprod``) for a VP scheduler, a :class:`~steindiff.noise.FlowProcess` for a
    flow-matching one (:func:`is_flow_scheduler`).

    VP: betas come from ``trained_betas`` or from ``beta_schedule`` (``linear``, ``scaled_linear``,
    ``squaredcos_cap_v2``) with ``beta_start``, ``beta_end`` and ``num_train_timesteps``.  With
    ``rescale_betas_zero_snr`` the last ``alphas_cumprod`` is set to ``2**-24``, as diffusers' Euler
    scheduler does (a terminal SNR of exactly 0 has no VE noise level).  Raises ValueError for VE
    schedulers and for tables that disagree with ``num_train_timesteps`` or with the scheduler's own
    ``alphas_cumprod``.

    Flow: the process's ``schedule`` (:class:`~steindiff.schedules.FlowSchedule`, the ``"flow"`` schedule) gives
    the noise levels the scheduler's ``set_timesteps(n, mu=mu)`` gives: static ``shift`` (``flow_shift``),
    ``use_dynamic_shifting`` with ``time_shift_type`` and the resolution shift ``mu`` (or ``image_seq_len``, from
    which ``mu`` is computed as FLUX pipelines do, with the config's ``base_shift``, ``max_shift``,
    ``base_image_seq_len`` and ``max_image_seq_len``), ``shift_terminal``, and FlowMatchEuler's Karras,
    exponential or beta spacing.  Dynamic shifting without ``mu`` builds the process, and asking it for the
    flow schedule then names the missing ``mu`` (diffusers raises it in ``set_timesteps``).  ``t = 1`` (where
    FlowMatchEuler starts) is ``t_max`` (default ``1 - FLOW_T_DELTA``); ``t_min = 1 / num_train_timesteps``.
    Settings with no exact steindiff counterpart (``stochastic_sampling``, ``invert_sigmas``,
    ``final_sigmas_type='sigma_min'``, the multistep schedulers' VP-table spacings with flow sigmas,
    thresholding, an unknown ``time_shift_type``, ...) raise ValueError naming the field.
    """
    if is_flow_scheduler(scheduler_or_config):
        cfg, cls = _config_of(scheduler_or_config)
        return _flow_process(cfg, cls, mu, image_seq_len, t_max)
    if mu is not None or image_seq_len is not None or t_max is not None:
        raise ValueError("mu, image_seq_len and t_max apply to flow-matching schedulers only")
    cfg, cls = _config_of(scheduler_or_config)
    if "beta_schedule" not in cfg and cfg.get("trained_betas") is None:
        kind = "VE scheduler" if ("sigma_max" in cfg or "sigma_min" in cfg) else "scheduler without a beta schedule"
        raise ValueError(f"{kind} {cls or '(config)'} is not supported: steindiff's diffusers bridge needs a VP "
                         "(DDPM-family) scheduler with beta_schedule or trained_betas (for a VE/EDM model wrap the "
                         "network with steindiff.models.EDMPrecond or pass a VE denoiser directly)")
    n = int(cfg.get("num_train_timesteps", 1000))
    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
        if betas.ndim != 1 or len(betas) != n:
            raise ValueError(f"trained_betas has {betas.size} entries but num_train_timesteps is {n}")
    else:
        schedule = cfg.get("beta_schedule", "linear")
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"unsupported beta_schedule {schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")
        betas = betas_for_schedule(schedule, n, float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02)))
    ac = np.cumprod(1.0 - betas)
    if cfg.get("rescale_betas_zero_snr"):
        ac = zero_snr_alphas_cumprod(ac)
    table = None if isinstance(scheduler_or_config, Mapping) else getattr(scheduler_or_config, "alphas_cumprod", None)
    if table is not None:
        table = np.asarray(torch.as_tensor(table).detach().cpu().double().numpy())
        if table.shape != ac.shape:
            raise ValueError(f"the scheduler's alphas_cumprod has {table.size} entries but its config gives "
                             f"num_train_timesteps={n}: timestep ranges do not match")
        if not np.allclose(table, ac, rtol=1e-4, atol=1e-6):
            raise ValueError("the scheduler's alphas_cumprod differs from the table its config describes "
                             f"(max abs difference {np.abs(table - ac).max():.3g}); pass a consistent scheduler")
    return DiscreteVPProcess(alphas_cumprod=ac)


class _DiffusersNet(nn.Module):
    """``net(x_vp, t, **extra) = unet(x_vp, timestep=t, **extra).sample``; floating extra tensors are cast
    to the UNet's dtype; a learned-variance output (twice the input channels) keeps its first half."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, **extra: Any) -> torch.Tensor:
        extra = {k: (v.to(x.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                 for k, v in extra.items()}
        out = self.unet(x, timestep=t, **extra)
        out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)
        if out.ndim >= 2 and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]
        return out


def _network_dtype(net: Any) -> torch.dtype | None:
    dtype = getattr(net, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        p = next(iter(net.parameters()), None) if isinstance(net, nn.Module) else None
        dtype = p.dtype if p is not None else None
    return dtype


def flow_time_scale(model: Any) -> float:
    """The model-time convention of a diffusers flow transformer: the timestep its pipeline passes is
    ``t * 1000`` (``SD3Transformer2DModel``, and the default), or ``t`` in [0, 1] for ``FluxTransformer2DModel``
    (``FluxPipeline`` divides by 1000; the transformer multiplies back inside)."""
    return 1.0 if "Flux" in type(model).__name__ else 1000.0


def denoiser_from_diffusers(unet: nn.Module, scheduler_or_config: Any, *, dtype: torch.dtype | None = None,
                            timestep: str | None = None, time_scale: float | None = None, mu: float | None = None,
                            image_seq_len: int | None = None, t_max: float | None = None
                            ) -> VPDenoiser | FlowDenoiser:
    """A VE denoiser ``D(x, sigma, **extra)`` for a diffusers network trained with ``scheduler_or_config``.

    VP schedulers (a UNet): the network sees ``x_vp = x / sqrt(1 + sigma^2)`` and the timestep of ``sigma`` on the
    scheduler's table (``timestep="interp"``, the default: fractional, as diffusers' Euler/Heun schedulers;
    ``"round"``: the nearest integer, as DPM-Solver/UniPC with Karras sigmas).

    Flow-matching schedulers (a transformer: ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ...): a
    :class:`~steindiff.models.FlowDenoiser` of the velocity, on :func:`process_from_scheduler`'s
    :class:`~steindiff.noise.FlowProcess` (``mu``, ``image_seq_len``, ``t_max`` go there).  The network sees
    ``x_t = x / (1 + sigma)`` and ``timestep = t * time_scale``: default :func:`flow_time_scale` (1000 for SD3, 1
    for FLUX).  ``timestep``: ``"continuous"`` (default, as the flow-matching Euler and Heun schedulers) or
    ``"floor"`` (the integer part, as DPM-Solver and UniPC with ``use_flow_sigmas`` pass it).  FLUX's
    transformer works on packed latents ``(B, tokens, 4 C)``: sample that packed state and pass ``img_ids``,
    ``txt_ids``, ``pooled_projections``, ``encoder_hidden_states`` (and ``guidance``) as extra arguments; packing
    and unpacking (``FluxPipeline._pack_latents`` / ``_unpack_latents``) stay with the pipeline.

    ``extra`` keyword arguments go to the network (``encoder_hidden_states`` for ``UNet2DConditionModel``,
    ``class_labels``, ...).  ``dtype``: the network's input dtype (default: its parameters' dtype).  The result's
    ``process`` is the scheduler's process (for schedules and prior noise) and ``scheduler_config`` its config.
    """
    cfg, cls = _config_of(scheduler_or_config)
    if is_flow_scheduler(scheduler_or_config):
        process = process_from_scheduler(scheduler_or_config, mu=mu, image_seq_len=image_seq_len, t_max=t_max)
        den: VPDenoiser | FlowDenoiser = FlowDenoiser(
            _DiffusersNet(unet), process, "velocity", time_scale=flow_time_scale(unet) if time_scale is None
            else float(time_scale), dtype=dtype or _network_dtype(unet), timestep=timestep or "continuous")
        den.scheduler_config = cfg
        return den
    if time_scale is not None:
        raise ValueError("time_scale applies to flow-matching models; a VP scheduler's timesteps are its table's")
    pred = cfg.get("prediction_type", "epsilon")
    process = process_from_scheduler(scheduler_or_config, mu=mu, image_seq_len=image_seq_len, t_max=t_max)
    if pred not in PREDICTION_TYPE_MAP:
        raise ValueError(f"unsupported prediction_type {pred!r} of scheduler {cls or '(config)'}; "
                         f"supported: {', '.join(PREDICTION_TYPE_MAP)}")
    unet_cfg = getattr(unet, "config", None)
    unet_n = unet_cfg.get("num_train_timesteps") if isinstance(unet_cfg, Mapping) else None
    if unet_n is not None and int(unet_n) != process.num_train_timesteps:
        raise ValueError(f"the UNet was built for num_train_timesteps={unet_n} but the scheduler's table has "
                         f"{process.num_train_timesteps} timesteps")
    den = VPDenoiser(_DiffusersNet(unet), process, PREDICTION_TYPE_MAP[pred], timestep=timestep or "interp",
                     dtype=dtype or _network_dtype(unet))
    den.scheduler_config = cfg
    return den


def _batch_to(v: Any, n: int, name: str) -> Any:
    """A conditioning tensor of batch 1 (or ``n / k``) repeated to batch ``n``; other values unchanged."""
    if not isinstance(v, torch.Tensor) or v.ndim == 0:
        return v
    b = v.shape[0]
    if b == n:
        return v
    if b >= 1 and n % b == 0:
        return v.repeat_interleave(n // b, dim=0)
    raise ValueError(f"{name} has batch size {b}, which does not divide the sample batch size {n}")


def _as_cond(c: Any, key: str) -> dict:
    if c is None:
        return {}
    if isinstance(c, Mapping):
        return dict(c)
    return {key: c}


#: Prefix of the per-call unconditional arguments of :class:`CFGDenoiser` (``"uncond:encoder_hidden_states"``):
#: not a Python identifier, so it cannot collide with a keyword argument of the wrapped denoiser.
UNCOND_PREFIX = "uncond:"


class CFGDenoiser(nn.Module):
    """Classifier-free guidance in VE coordinates: ``D = D_u + s (D_c - D_u)`` (Ho & Salimans 2022).

    ``cond``/``uncond``: the conditional and unconditional extra arguments of ``denoiser``, either a
    tensor (passed as ``cond_key``, default ``encoder_hidden_states``) or a dict of keyword
    arguments (e.g. ``{"class_labels": labels}``).  Tensors of batch 1 (or a divisor of the batch)
    are repeated to the batch.  With ``batched=True`` both halves go through one model call of
    twice the batch (counted as one pass); ``scale == 1`` calls the conditional model only.  Pure
    tensor algebra, so a stabilizer differentiates through it.  For epsilon- and v-prediction models
    it equals diffusers' guidance on the network output (``D`` is affine in it at fixed ``x``).

    Per-sample conditioning can instead come with each call, as extra arguments: ``key=c`` for the
    conditional half and ``"uncond:" + key`` (:data:`UNCOND_PREFIX`) for the unconditional one, e.g.
    ``model(x, sigma, **{"encoder_hidden_states": c, "uncond:encoder_hidden_states": u})``.  Being
    per-sample extra arguments, they are split and cycled with the batch by the sampler and the
    calibration (:func:`steindiff.calibration.calibrate`); this is how :func:`~.diffusers_pipeline.sample_pipeline` and
    :func:`calibrate_pipeline` condition the model.  Other extra arguments go to both halves.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], scale: float, cond: Any = None, uncond: Any = None, *,
                 cond_key: str = "encoder_hidden_states", batched: bool = True):
        super().__init__()
        self.denoiser, self.scale, self.batched = denoiser, float(scale), batched
        self.cond, self.uncond = _as_cond(cond, cond_key), _as_cond(uncond, cond_key)
        if self.scale != 1.0 and cond is not None:
            if uncond is None:
                raise ValueError(f"guidance scale {self.scale} needs the unconditional arguments (uncond)")
            if set(self.cond) != set(self.uncond):
                raise ValueError(f"cond and uncond must have the same keys, got {sorted(self.cond)} and "
                                 f"{sorted(self.uncond)}")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(n)
        call_uncond = {k[len(UNCOND_PREFIX):]: extra.pop(k) for k in [k for k in extra if k.startswith(UNCOND_PREFIX)]}
        missing = sorted(k for k in call_uncond if k not in extra)
        if missing:
            raise ValueError(f"unconditional arguments {', '.join(UNCOND_PREFIX + k for k in missing)} were given "
                             f"without their conditional counterparts {', '.join(missing)}")
        call_cond = {k: extra.pop(k) for k in call_uncond}
        cond = {k: _batch_to(v, n, f"cond[{k!r}]") for k, v in {**self.cond, **call_cond}.items()}
        if self.scale == 1.0:
            return self.denoiser(x, sigma, **cond, **extra)
        uncond = {k: _batch_to(v, n, f"uncond[{k!r}]") for k, v in {**self.uncond, **call_uncond}.items()}
        if not cond or set(cond) != set(uncond):
            raise ValueError(f"guidance scale {self.scale} needs conditional and unconditional arguments with the same "
                             f"keys, got {sorted(cond)} and {sorted(uncond)}")
        if not self.batched:
            d_u = self.denoiser(x, sigma, **uncond, **extra)
            d_c = self.denoiser(x, sigma, **cond, **extra)
        else:
            both = {k: (torch.cat([uncond[k], v]) if isinstance(v, torch.Tensor) and v.ndim > 0 else v)
                    for k, v in cond.items()}
            ex = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v)
                  for k, v in extra.items()}
            d_u, d_c = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **ex).chunk(2)
        return d_u + self.scale * (d_c - d_u)


def _sample_shape(unet: Any) -> tuple[int, ...]:
    cfg = getattr(unet, "config", None)
    if not isinstance(cfg, Mapping) or cfg.get("in_channels") is None or cfg.get("sample_size") is None:
        raise ValueError("cannot infer the latent shape from the UNet config (in_channels, sample_size); pass latents")
    size = cfg["sample_size"]
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    return (int(cfg["in_channels"]), *hw)


@dataclass
class PipelineModel:
    """What a pipeline's UNet is sampled as (:func:`pipeline_model`), shared by
    :func:`~.diffusers_pipeline.sample_pipeline` and :func:`calibrate_pipeline` so that a calibration is fitted
    on exactly the model it is applied to.

    ``denoiser``: the UNet as a VE denoiser (:func:`denoiser_from_diffusers`).  ``model``: that
    denoiser, or a :class:`CFGDenoiser` over it when ``guidance_scale > 1``.  ``cond``: the
    conditioning as per-sample extra arguments of ``model`` at batch ``batch`` (``None``:
    unconditional), with the unconditional inputs under :data:`UNCOND_PREFIX` keys when guided.
    ``sample_shape``: one latent's shape.
    """

    denoiser: VPDenoiser
    model: Callable[..., torch.Tensor]
    cond: dict[str, Any]
    batch: int | None
    guidance_scale: float
    sample_shape: tuple[int, ...]
    name: str

    @property
    def process(self) -> DiscreteVPProcess:
        return self.denoiser.process

    def extra_args(self, n: int) -> dict[str, Any]:
        """The conditioning for a sample batch of ``n``: each row repeated ``n / batch`` times, in order."""
        return {k: _batch_to(v, n, k.replace(UNCOND_PREFIX, "negative ")) for k, v in self.cond.items()}

    def spec(self) -> ModelSpec:
        """The :class:`~steindiff.models.registry.ModelSpec` a calibration keys and fits: ``model`` (its
        ``state_dict`` is the UNet's weights, the fingerprint of :func:`steindiff.calibration.model_fingerprint`)
        on the pipeline's VP process."""
        return ModelSpec(name=self.name, denoiser=self.model, process=self.process, sample_shape=self.sample_shape)

    def conditioning(self) -> dict[str, Any]:
        """What besides the weights makes this model: the guidance scale, a hash of the conditioning
        tensors (prompt embeddings, negative ones when guided, class labels), the timestep convention
        and the prediction type."""
        return {"integration": "diffusers", "guidance_scale": self.guidance_scale,
                "conditioning": conditioning_digest(self.cond), "timestep": self.denoiser.timestep,
                "prediction": self.denoiser.prediction}

    def conditioning_key(self) -> str:
        """:meth:`conditioning` as the ``conditioning`` string of the calibration cache's key."""
        return json.dumps(self.conditioning(), sort_keys=True)


def pipeline_model(pipe: Any, *, prompt_embeds: torch.Tensor | None = None,
                   negative_prompt_embeds: torch.Tensor | None = None, class_labels: Any = None,
                   negative_class_labels: Any = None, guidance_scale: float = 1.0,
                   timestep: Literal["interp", "round"] = "interp",
                   sample_shape: Sequence[int] | None = None) -> PipelineModel:
    """The model :func:`~.diffusers_pipeline.sample_pipeline` samples, with its conditioning (:class:`PipelineModel`).

    ``prompt_embeds`` go to the UNet as ``encoder_hidden_states``, ``class_labels`` as ``class_labels``.
    With ``guidance_scale > 1`` (diffusers' convention) the model is a :class:`CFGDenoiser` and needs
    ``negative_prompt_embeds`` / ``negative_class_labels`` (no text encoder is run here).  The
    conditioning batch is the largest batch among these tensors; every other one must divide it and is
    repeated to it.  ``sample_shape``: one latent's shape (default: from the UNet's config).
    """
    unet = getattr(pipe, "unet", None)
    scheduler = getattr(pipe, "scheduler", None)
    if unet is None or scheduler is None:
        raise ValueError("the pipeline needs a `unet` and a `scheduler` (for a flow pipeline, SD3 or FLUX: "
                         "sample_pipeline from steindiff.integrations.diffusers_pipeline, or calibrate_scheduler from "
                         "steindiff.integrations.diffusers_scheduler)")
    den = denoiser_from_diffusers(unet, scheduler, timestep=timestep)
    device = getattr(unet, "device", torch.device("cpu"))
    guided = float(guidance_scale) > 1.0
    pairs = [("encoder_hidden_states", prompt_embeds, negative_prompt_embeds, "negative_prompt_embeds"),
             ("class_labels", class_labels, negative_class_labels, "negative_class_labels")]
    cond = {k: torch.as_tensor(c).to(device) for k, c, _, _ in pairs if c is not None}
    uncond: dict[str, torch.Tensor] = {}
    if guided:
        if not cond:
            raise ValueError("guidance_scale > 1 needs conditioning (prompt_embeds or class_labels)")
        missing = [neg_name for k, c, u, neg_name in pairs if c is not None and u is None]
        if missing:
            raise ValueError(f"guidance_scale={guidance_scale} needs {', '.join(missing)} "
                             "(the unconditional inputs, e.g. the encoded empty prompt or the null class)")
        uncond = {UNCOND_PREFIX + k: torch.as_tensor(u).to(device) for k, c, u, _ in pairs if c is not None}
    batch = max((v.shape[0] for v in (*cond.values(), *uncond.values()) if v.ndim > 0), default=None)
    extra = {**cond, **uncond}
    if batch is not None:
        extra = {k: _batch_to(v, batch, k.replace(UNCOND_PREFIX, "negative ")) for k, v in extra.items()}
    model: Callable[..., torch.Tensor] = CFGDenoiser(den, float(guidance_scale)) if guided else den
    shape = tuple(int(s) for s in sample_shape) if sample_shape is not None else _sample_shape(unet)
    return PipelineModel(den, model, extra, batch, float(guidance_scale) if guided else 1.0, shape,
                         f"diffusers:{type(unet).__name__}")


def _base_plan(process: DiscreteVPProcess, solver: str, nfe: int, schedule: str | Sequence[float] | torch.Tensor,
               rho: float, solver_options: dict | None) -> SamplingPlan:
    if isinstance(schedule, str):
        return make_plan(process, solver, nfe, schedule, rho=rho, solver_options=solver_options)
    return make_plan(process, solver, nfe, sigmas=schedule, solver_options=solver_options)


def _stderr_notice(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _calibrated(pm: PipelineModel, base: SamplingPlan, *, cache_dir: str | os.PathLike | None,
                calibrate_missing: bool | str, dtype: torch.dtype | None, progress: bool,
                notice: Callable[[str], None] | None, options: dict) -> SamplingPlan:
    """:func:`steindiff.calibration.calibrated_plan` of ``pm`` over its conditioning (cycled to the
    calibration batch), keyed by :meth:`PipelineModel.conditioning_key` (``notice``: its one-line messages)."""
    plan = calibrated_plan(pm.spec(), base, cache_dir=cache_dir, calibrate_missing=calibrate_missing,
                           conditioning=pm.conditioning_key(), extra_args=pm.cond or None, progress=progress,
                           notice=notice, **{**options, "dtype": dtype})
    plan.meta["diffusers"] = pm.conditioning()
    return plan


def _recorded_conditioning(meta: Mapping) -> dict | None:
    """The :meth:`PipelineModel.conditioning` a calibration was made for, if it records one."""
    if isinstance(meta.get("diffusers"), Mapping):
        return dict(meta["diffusers"])
    key = meta.get("key")
    cond = key.get("conditioning") if isinstance(key, Mapping) else None
    if isinstance(cond, str):
        try:
            rec = json.loads(cond)
        except ValueError:
            return None
        if isinstance(rec, dict) and rec.get("integration") == "diffusers":
            return rec
    return None


def calibrate_pipeline(
    pipe: Any,
    *,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    class_labels: Any = None,
    negative_class_labels: Any = None,
    solver: str,
    nfe: int,
    schedule: str | Sequence[float] | torch.Tensor,
    cache_dir: str | os.PathLike | None = None,
    rho: float = 7.0,
    timestep: Literal["interp", "round"] = "interp",
    sample_shape: Sequence[int] | None = None,
    solver_options: dict | None = None,
    dtype: torch.dtype | None = None,
    calibrate_missing: bool | str = "always",
    progress: bool = False,
    notice: Callable[[str], None] | None = _stderr_notice,
    **options: Any,
) -> SamplingPlan:
    """The calibrated sampler (issue 9; :func:`steindiff.calibration.calibrated_plan`, trajectory objective)
    of a diffusers pipeline, over the user's conditioning: fitted on first use and cached.

    The model is the one :func:`~.diffusers_pipeline.sample_pipeline` samples with the same arguments
    (:func:`pipeline_model`: the UNet as a VE denoiser, under classifier-free guidance when
    ``guidance_scale > 1``).  The calibration batch sees ``prompt_embeds`` (a batch of embeddings, one per
    prompt; with guidance, ``negative_prompt_embeds`` of batch 1 or the same batch) and ``class_labels``
    cycled to its size, so in the user's proportions.  The cache (``cache_dir``, default
    :func:`steindiff.calibration.default_cache_dir`) is keyed by the UNet's weights, the latent shape, the
    process, ``solver``, the base noise levels (``nfe``, ``schedule``: ``karras``, ``logsnr``, ``time``
    or explicit VE sigmas) and :meth:`PipelineModel.conditioning_key`: the guidance scale, a hash of the
    embeddings and labels, the timestep convention and the prediction type.  A different guidance
    scale or other prompts calibrate anew.

    ``notice`` gets a one-line message before a calibration starts (default: standard error; ``None``
    for none).  ``calibrate_missing``: ``"always"`` (the default: this function is asked for the fit),
    ``"if-quick"``, or ``"never"`` (``False``: only reads the cache; the plain plan when nothing is cached), as
    in :func:`steindiff.calibration.calibrated_plan`.  ``dtype`` and ``options`` go to
    :func:`steindiff.calibration.calibrate` (``n``, ``ref_steps``,
    ``max_solves``, ``max_seconds``, ``seed``, ``fit``, ...; defaults: those of every entry point,
    :data:`steindiff.calibration.CALIBRATION_DEFAULTS`).  Apply the result with
    ``sample_pipeline(pipe, ..., calibration=plan)`` or a k-diffusion-style ``sample_*(...,
    calibration=plan)`` function; ``plan.meta["diffusers"]`` records the conditioning it was made for.
    """
    pm = pipeline_model(pipe, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                        class_labels=class_labels, negative_class_labels=negative_class_labels,
                        guidance_scale=guidance_scale, timestep=timestep, sample_shape=sample_shape)
    base = _base_plan(pm.process, solver, nfe, schedule, rho, solver_options)
    return _calibrated(pm, base, cache_dir=cache_dir, calibrate_missing=calibrate_missing, dtype=dtype,
                       progress=progress, notice=notice, options=options)
