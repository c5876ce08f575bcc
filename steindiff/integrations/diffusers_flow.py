"""Flow-matching diffusers pipelines (Stable Diffusion 3, FLUX): their scheduler configs and transformers.

- :func:`flow_scheduler_config`: a flow-matching scheduler config (``FlowMatchEulerDiscreteScheduler`` and the
  multistep schedulers with ``use_flow_sigmas``) as a :class:`FlowSchedulerConfig`, its time shift (static
  ``shift``, or dynamic shifting by ``mu``) in diffusers' field names: what
  :class:`~steindiff.integrations.diffusers_scheduler.SteinDiffScheduler`, the pipeline helpers below and the
  diffusers export use.  The config is read, and refused naming the field, by the one reader of flow configs that
  :func:`~steindiff.integrations.diffusers.process_from_scheduler` uses; its levels are those of
  :class:`~steindiff.schedules.FlowSchedule`.
- :func:`flow_pipeline_model`: a flow pipeline's transformer as a VE denoiser (:class:`~steindiff.models.FlowDenoiser`,
  velocity prediction), under classifier-free guidance (SD3) or with FLUX's embedded guidance, as the pipeline
  calls it: the :class:`~steindiff.integrations.diffusers.PipelineModel` that
  :func:`~steindiff.integrations.diffusers_scheduler.calibrate_scheduler` fits.
- :func:`pipeline_mu`: the resolution shift ``mu`` a pipeline passes to its scheduler for an image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..models.denoisers import FlowDenoiser
from ..noise import FLOW_T_DELTA, FlowProcess
from ..schedules import FLOW_GRIDS, FlowSchedule, flow_shift_mu
from .diffusers import (
    UNCOND_PREFIX,
    CFGDenoiser,
    PipelineModel,
    _batch_to,
    _config_of,
    _flow_schedule,
    _refuse,
    is_flow_scheduler,
    pipeline_model,
)

__all__ = ["FlowSchedulerConfig", "flow_scheduler_config", "flow_pipeline_model", "pipeline_mu",
           "pipeline_schedule_kwargs", "FlowPipelineModel", "encode_prompts", "any_pipeline_model", "image_size",
           "check_flow_pipeline", "FLOW_TRANSFORMERS"]


@dataclass(frozen=True)
class FlowSchedulerConfig:
    """What a flow-matching scheduler config says about sampling, in its own field names: the time shift and the
    training table's size.

    ``shift``: the static shift ``t' = shift t / (1 + (shift - 1) t)`` (Esser et al. 2024, Eq. 23); with
    ``use_dynamic_shifting`` the shift comes from ``mu`` instead (FLUX), ``exponential`` or ``linear``
    (``time_shift_type``).  ``base_shift``, ``max_shift``, ``base_image_seq_len`` and ``max_image_seq_len`` give
    ``mu`` for an image sequence length (:meth:`mu`).  ``grid``: whose levels ``set_timesteps(n)`` makes
    (:class:`~steindiff.schedules.FlowSchedule`): ``euler`` (``FlowMatchEulerDiscreteScheduler`` and
    ``FlowMatchHeunDiscreteScheduler``), ``dpm`` or ``unipc`` (``DPMSolverMultistepScheduler`` or
    ``UniPCMultistepScheduler`` with ``use_flow_sigmas``); the scheduler's class, not a field of its config.
    :meth:`schedule` is the :class:`~steindiff.schedules.FlowSchedule` of a ``set_timesteps(..., mu=mu)`` call.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    grid: str = "euler"

    def mu(self, image_seq_len: int, *, max_shift: float | None = None) -> float:
        """diffusers' ``calculate_shift`` (:func:`~steindiff.schedules.flow_shift_mu`) with this config's fields
        (``max_shift``: the pipeline's own, where it passes one)."""
        return flow_shift_mu(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                             self.max_shift if max_shift is None else max_shift)

    def schedule(self, mu: float | None = None) -> FlowSchedule:
        """The scheduler's levels of ``set_timesteps(n, mu=mu)`` (``times(n)``, on its ``grid``) and the shift it
        applies to the sigmas a pipeline passes (``shifted``): ``mu`` is required with dynamic shifting, ignored
        without (as diffusers ignores it)."""
        return FlowSchedule(shift=self.shift, dynamic=self.use_dynamic_shifting,
                            mu=float(mu) if self.use_dynamic_shifting and mu is not None else None,
                            shift_type=self.time_shift_type, grid=self.grid,
                            num_train_timesteps=self.num_train_timesteps)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def flow_scheduler_config(scheduler_or_config: Any) -> FlowSchedulerConfig:
    """A flow-matching scheduler (or its config) as a :class:`FlowSchedulerConfig`.

    Read as :func:`~steindiff.integrations.diffusers.process_from_scheduler` reads it (``shift``, or
    ``flow_shift`` with ``use_flow_sigmas``; ``use_dynamic_shifting``, ``time_shift_type`` and the resolution
    fields): ValueError naming the field for what that refuses, for a config that is not a flow config, and for
    FlowMatchEuler's ``shift_terminal`` and Karras, exponential or beta spacings, which this record does not hold
    (``process_from_scheduler`` reproduces them).
    """
    if not is_flow_scheduler(scheduler_or_config):
        name = _config_of(scheduler_or_config)[1] or "(config)"
        raise ValueError(f"scheduler {name} is not a flow-matching scheduler (no FlowMatch class, use_flow_sigmas, "
                         "flow_prediction or shift without a beta schedule)")
    cfg, cls = _config_of(scheduler_or_config)
    grid = None
    if cfg.get("process") == "flow":  # a SteinDiffScheduler's config: FlowMatchEuler's fields and the grid it steps
        cls, grid = "FlowMatchEulerDiscreteScheduler", cfg.get("flow_grid", "euler")
        if grid not in FLOW_GRIDS:
            _refuse("SteinDiffScheduler", "flow_grid", grid, f"the flow grids are {', '.join(FLOW_GRIDS)}")
    schedule, resolution = _flow_schedule(cfg, cls)
    why = ("a FlowSchedulerConfig (SteinDiffScheduler, the flow pipeline helpers, the diffusers export) holds the "
           "time shift only; steindiff.integrations.diffusers.process_from_scheduler reproduces it")
    if schedule.shift_terminal is not None:
        _refuse(cls, "shift_terminal", cfg["shift_terminal"], why)
    if schedule.spacing is not None:
        _refuse(cls, f"use_{schedule.spacing}_sigmas", cfg[f"use_{schedule.spacing}_sigmas"], why)
    return FlowSchedulerConfig(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift,
                               use_dynamic_shifting=schedule.dynamic, time_shift_type=schedule.shift_type,
                               grid=grid or schedule.grid, **resolution)


# ------------------------------------------------------------------------------------------------------------
# pipelines
# ------------------------------------------------------------------------------------------------------------
#: The transformers of the flow pipelines steindiff samples (Stable Diffusion 3, FLUX).
FLOW_TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel")


def _is_flux(pipe: Any) -> bool:
    return "Flux" in type(pipe).__name__ or "Flux" in type(getattr(pipe, "transformer", None)).__name__


def check_flow_pipeline(pipe: Any) -> str:
    """The class name of a flow pipeline's transformer; ValueError naming it unless it is one of
    :data:`FLOW_TRANSFORMERS`, or when the pipeline lacks a transformer or a scheduler."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or getattr(pipe, "scheduler", None) is None:
        raise ValueError("a flow pipeline needs a `transformer` and a `scheduler`")
    kind = type(transformer).__name__
    if kind not in FLOW_TRANSFORMERS:
        raise ValueError(f"transformer {kind} is not supported: steindiff's flow pipelines are Stable Diffusion 3 "
                         "(SD3Transformer2DModel) and FLUX (FluxTransformer2DModel)")
    return kind


def _latent_hw(pipe: Any, height: int, width: int) -> tuple[int, int]:
    """The latent grid of an image of ``height x width`` pixels, as the pipeline's ``prepare_latents`` makes it."""
    f = int(getattr(pipe, "vae_scale_factor", 8))
    if _is_flux(pipe):  # packed 2x2: a multiple of 2 after the VAE's factor
        return 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))
    return int(height) // f, int(width) // f


def pipeline_mu(pipe: Any, height: int, width: int) -> float | None:
    """The ``mu`` a flow pipeline passes to ``set_timesteps`` for an image of ``height x width`` pixels (``None``
    where it passes none: Stable Diffusion 3 without dynamic shifting).  FLUX: ``calculate_shift`` of the packed
    sequence length; SD3: of ``(h / patch) (w / patch)``, with the pipeline's own default ``max_shift`` (1.16)."""
    cfg = flow_scheduler_config(pipe.scheduler)
    h, w = _latent_hw(pipe, height, width)
    if _is_flux(pipe):
        return cfg.mu((h // 2) * (w // 2))
    if not cfg.use_dynamic_shifting:
        return None
    p = int(pipe.transformer.config.patch_size)
    raw = dict(pipe.scheduler.config)
    return cfg.mu((h // p) * (w // p), max_shift=float(raw.get("max_shift", 1.16) or 1.16))


def pipeline_schedule_kwargs(pipe: Any, num_inference_steps: int, height: int, width: int) -> dict:
    """What a flow pipeline passes to ``scheduler.set_timesteps`` besides the step count: FLUX its own sigmas
    ``linspace(1, 1/n, n)`` and ``mu``; SD3 ``mu`` with dynamic shifting only."""
    out: dict[str, Any] = {}
    mu = pipeline_mu(pipe, height, width)
    if mu is not None:
        out["mu"] = mu
    if _is_flux(pipe):
        out["sigmas"] = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()
    return out


class _TransformerNet(nn.Module):
    """``net(x_t, t, **extra) = transformer(hidden_states=x_t, timestep=t, **fixed, **extra)[0]``; ``guidance``
    (FLUX's embedded guidance) is passed per sample when set; floating tensors are cast to ``x``'s dtype."""

    def __init__(self, transformer: nn.Module, fixed: dict | None = None, guidance: float | None = None):
        super().__init__()
        self.transformer, self.fixed, self.guidance = transformer, dict(fixed or {}), guidance

    def forward(self, x: torch.Tensor, t: torch.Tensor, **extra: Any) -> torch.Tensor:
        kw = {k: (v.to(x.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in {**self.fixed, **extra}.items()}
        if self.guidance is not None:
            kw["guidance"] = torch.full((x.shape[0],), self.guidance, dtype=torch.float32, device=x.device)
        return self.transformer(hidden_states=x, timestep=t, return_dict=False, **kw)[0]


@dataclass
class FlowPipelineModel(PipelineModel):
    """:class:`~steindiff.integrations.diffusers.PipelineModel` of a flow pipeline: ``denoiser`` is a
    :class:`~steindiff.models.FlowDenoiser`; ``embedded_guidance`` is FLUX's guidance input (``None``: none)."""

    embedded_guidance: float | None = None
    pipeline: str = ""

    def conditioning(self) -> dict[str, Any]:
        from ..calibration import conditioning_digest

        return {"integration": "diffusers", "pipeline": self.pipeline, "guidance_scale": self.guidance_scale,
                "embedded_guidance": self.embedded_guidance, "conditioning": conditioning_digest(self.cond),
                "time_scale": self.denoiser.time_scale, "prediction": self.denoiser.prediction}


def flow_pipeline_model(pipe: Any, *, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                        negative_prompt_embeds: torch.Tensor | None = None,
                        negative_pooled_prompt_embeds: torch.Tensor | None = None, guidance_scale: float = 1.0,
                        height: int | None = None, width: int | None = None, text_ids: torch.Tensor | None = None,
                        t_max: float = 1.0 - FLOW_T_DELTA) -> FlowPipelineModel:
    """The model a flow pipeline samples (Stable Diffusion 3: ``transformer(hidden_states, timestep=1000 t,
    encoder_hidden_states, pooled_projections)``; FLUX: packed latents, ``timestep=t``, ``txt_ids``/``img_ids`` and,
    when the transformer embeds it, ``guidance``), as a VE denoiser with its conditioning.

    SD3 with ``guidance_scale > 1`` is classifier-free guidance over ``negative_*`` (as the pipeline applies it to
    the velocity, which the denoised estimate is affine in).  FLUX: ``guidance_scale`` is the embedded guidance
    (no second pass), as ``FluxPipeline`` uses it.  ``height``/``width``: the image size in pixels (default: the
    transformer's ``sample_size`` times the VAE's factor).  The process is a :class:`~steindiff.noise.FlowProcess`
    from ``1/num_train_timesteps`` to ``t_max`` (diffusers' ``t = 1`` has no VE level: ``1 - FLOW_T_DELTA``,
    :data:`steindiff.noise.FLOW_T_DELTA`, as everywhere in steindiff).
    """
    kind = check_flow_pipeline(pipe)
    transformer = pipe.transformer
    cfg = flow_scheduler_config(pipe.scheduler)
    flux = _is_flux(pipe)
    tcfg = transformer.config
    h, w = _latent_hw(pipe, *image_size(pipe, height, width))
    device = getattr(transformer, "device", torch.device("cpu"))
    process = FlowProcess(1.0 / cfg.num_train_timesteps, t_max)
    fixed: dict[str, Any] = {}
    embedded = None
    if flux:
        c = int(tcfg.in_channels) // 4
        shape: tuple[int, ...] = ((h // 2) * (w // 2), c * 4)
        dtype = prompt_embeds.dtype
        fixed["img_ids"] = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
        fixed["txt_ids"] = (text_ids if text_ids is not None else
                            torch.zeros(prompt_embeds.shape[1], 3)).to(device=device, dtype=dtype)
        if tcfg.get("guidance_embeds"):
            embedded = float(guidance_scale)
        time_scale = cfg.num_train_timesteps / 1000.0  # FluxPipeline passes timestep / 1000
        guided = False
    else:
        shape = (int(tcfg.in_channels), h, w)
        time_scale = float(cfg.num_train_timesteps)
        guided = float(guidance_scale) > 1.0
    net = _TransformerNet(transformer, fixed, embedded)
    den = FlowDenoiser(net, process, "velocity", time_scale=time_scale, dtype=getattr(transformer, "dtype", None))
    keys = ("encoder_hidden_states", "pooled_projections")
    cond = {k: torch.as_tensor(v).to(device) for k, v in zip(keys, (prompt_embeds, pooled_prompt_embeds))}
    extra: dict[str, torch.Tensor] = dict(cond)
    if guided:
        if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs negative_prompt_embeds and "
                             "negative_pooled_prompt_embeds (the encoded negative prompt)")
        extra.update({UNCOND_PREFIX + k: torch.as_tensor(v).to(device)
                      for k, v in zip(keys, (negative_prompt_embeds, negative_pooled_prompt_embeds))})
    batch = max(v.shape[0] for v in extra.values())
    extra = {k: _batch_to(v, batch, k.replace(UNCOND_PREFIX, "negative ")) for k, v in extra.items()}
    model: Callable[..., torch.Tensor] = CFGDenoiser(den, float(guidance_scale)) if guided else den
    return FlowPipelineModel(den, model, extra, batch, float(guidance_scale) if guided else 1.0, shape,
                             f"diffusers:{kind}", embedded_guidance=embedded, pipeline=type(pipe).__name__)


def encode_prompts(pipe: Any, prompts: Sequence[str], *, negative_prompt: str = "", guidance_scale: float = 1.0,
                   **encode_options: Any) -> dict[str, torch.Tensor]:
    """The pipeline's own ``encode_prompt`` of ``prompts`` (one row each), as the keyword arguments of
    :func:`flow_pipeline_model` or :func:`~steindiff.integrations.diffusers.pipeline_model`: Stable Diffusion
    (``prompt_embeds``, ``negative_prompt_embeds``), SD3 (also the pooled ones), FLUX (``prompt_embeds``,
    ``pooled_prompt_embeds``, ``text_ids``).  The negative prompt is encoded only where guidance uses it;
    ``encode_options`` go to ``encode_prompt`` (e.g. ``max_sequence_length`` of SD3 and FLUX)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    device = getattr(getattr(pipe, "transformer", None) or pipe.unet, "device", torch.device("cpu"))
    guided = float(guidance_scale) > 1.0
    with torch.no_grad():
        if getattr(pipe, "transformer", None) is None:
            pe, npe = pipe.encode_prompt(prompts, device, 1, guided, negative_prompt=[negative_prompt] * len(prompts),
                                         **encode_options)
            out = {"prompt_embeds": pe}
            if guided:
                out["negative_prompt_embeds"] = npe
            return out
        if _is_flux(pipe):
            pe, ppe, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, **encode_options)
            return {"prompt_embeds": pe, "pooled_prompt_embeds": ppe, "text_ids": text_ids}
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                do_classifier_free_guidance=guided,
                                                negative_prompt=[negative_prompt] * len(prompts), **encode_options)
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
        if guided:
            out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
        return out


def any_pipeline_model(pipe: Any, *, guidance_scale: float = 1.0, height: int | None = None, width: int | None = None,
                       t_max: float = 1.0 - FLOW_T_DELTA, **embeds: Any) -> PipelineModel:
    """The model a pipeline samples, for a UNet pipeline (:func:`~steindiff.integrations.diffusers.pipeline_model`,
    fractional timesteps) or a flow one (:func:`flow_pipeline_model`), with the embeddings of
    :func:`encode_prompts`; ``height``/``width`` in pixels set the latent size."""
    if getattr(pipe, "transformer", None) is not None:
        return flow_pipeline_model(pipe, guidance_scale=guidance_scale, height=height, width=width, t_max=t_max,
                                   **embeds)
    shape = None
    if height is not None and width is not None:
        f = int(getattr(pipe, "vae_scale_factor", 8))
        shape = (int(pipe.unet.config.in_channels), int(height) // f, int(width) // f)
    return pipeline_model(pipe, prompt_embeds=embeds.get("prompt_embeds"),
                          negative_prompt_embeds=embeds.get("negative_prompt_embeds"), guidance_scale=guidance_scale,
                          sample_shape=shape)


def image_size(pipe: Any, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The image size in pixels a pipeline makes by default, unless given: its ``default_sample_size`` (SD3,
    FLUX), else its denoiser's ``sample_size``, times the VAE's factor."""
    f = int(getattr(pipe, "vae_scale_factor", 8))
    net = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    size = getattr(pipe, "default_sample_size", None)
    if size is None:
        size = net.config.get("sample_size", 64) if net is not None else 64
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
    return int(height or hw[0] * f), int(width or hw[1] * f)
