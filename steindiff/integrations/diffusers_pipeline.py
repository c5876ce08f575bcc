"""Sampling a diffusers pipeline with steindiff: :func:`sample_pipeline`, for a UNet pipeline (Stable Diffusion and
its relatives; the model of :func:`~.diffusers.pipeline_model`) or a flow one (Stable Diffusion 3, FLUX; the model
of :func:`~.diffusers_flow.flow_pipeline_model`, over the levels :class:`~.diffusers_scheduler.SteinDiffScheduler`
steps), with a steindiff solver and stabilizer or a calibrated sampler, decoding through the pipeline's VAE.

It sits above :mod:`.diffusers`, :mod:`.diffusers_flow` and :mod:`.diffusers_scheduler`, which it combines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch

from ..calibration import model_fingerprint
from ..noise import FLOW_T_DELTA
from ..plan import SamplingPlan
from ..sampling import sample
from ..solvers import get_solver, steps_for_nfe
from ..stabilizers import Stabilizer, registry
from ._calibration import Calibration, as_plan, canonical_solver, check_plan, refuse_with_stabilizer
from .diffusers import (
    DEFAULT_NFE,
    DEFAULT_SCHEDULE,
    DEFAULT_SOLVER,
    OUTPUT_TYPES,
    PipelineModel,
    _base_plan,
    _calibrated,
    _recorded_conditioning,
    _stderr_notice,
    pipeline_model,
)
from .diffusers_flow import (
    _is_flux,
    _latent_hw,
    check_flow_pipeline,
    flow_pipeline_model,
    image_size,
    pipeline_mu,
)
from .diffusers_scheduler import FLOW_SCHEDULES, _pipeline_record, base_mismatch, mu_mismatch, pipeline_plan

__all__ = ["sample_pipeline", "PipelineSample"]


@dataclass
class PipelineSample:
    """Output of :func:`sample_pipeline`.

    ``images``: as ``output_type`` asks (``latent``: the final latents; ``pt``: ``(B, C, H, W)`` in
    [0, 1]; ``np``: ``(B, H, W, C)`` float32 in [0, 1]; ``pil``: a list of PIL images).
    ``latents``: the final latents (VP coordinates at ``sigmas[-1]``; at ``sigma = 0`` the clean latents),
    before the VAE's scaling.  ``plan``: the sampling plan that ran (solver, noise levels and, for a
    calibrated sampler, its per-step gammas).
    """

    images: Any
    latents: torch.Tensor
    sigmas: torch.Tensor
    nfe: int
    extra_passes: int = 0
    trace: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    plan: SamplingPlan | None = None


def _flow_mismatch(plan: SamplingPlan, pipe: Any, pm: PipelineModel, size: tuple[int, int], rho: float) -> list[str]:
    """What makes a calibration another flow pipeline call's than this one (at ``size`` pixels): the plain
    levels it was fitted from (``meta["base_sigmas"]``) against this call's plain levels of its schedule (the
    pipeline's shift or ``mu``, the step count), named by the resolution shift ``mu`` where it records one
    (:func:`~steindiff.integrations.diffusers_scheduler.base_mismatch`, the scheduler's check)."""
    made = plan.meta.get("pipeline") if isinstance(plan.meta.get("pipeline"), Mapping) else {}
    base, schedule = plan.meta.get("base_sigmas"), plan.meta.get("schedule")
    mu, where = pipeline_mu(pipe, *size), f"{size[0]}x{size[1]} pixels"
    if base is None or schedule not in FLOW_SCHEDULES or len(base) != len(plan.sigmas):
        why = mu_mismatch(made, mu, where)  # no plain levels to compare: the resolution shift alone
    else:
        here = _plain_plan(pipe, pm, size, plan.solver, plan.nfe, schedule, rho, plan.solver_options)[0].sigmas
        why = base_mismatch(made, base, here, mu, here_size=where, cause="another shift, image size or schedule")
    return [why] if why else []


def _applied_plan(pm: PipelineModel, calibration: Calibration, *, solver: str | None, nfe: int | None,
                  schedule: str | Sequence[float] | torch.Tensor | None, solver_options: dict | None,
                  flow_call: tuple[Any, tuple[int, int], float] | None = None) -> SamplingPlan:
    """The plan of ``calibration`` for this pipeline model, refused (ValueError naming both values) when it
    was made for another solver, NFE, schedule, guidance scale (FLUX: embedded guidance) or network; for a flow
    pipeline (``flow_call``: the pipeline, the image size and ``rho``) also another resolution shift or shift
    (:func:`_flow_mismatch`)."""
    plan = as_plan(calibration, solver=solver or DEFAULT_SOLVER)
    bad = []
    made_for = canonical_solver(plan.solver, plan.solver_options)
    if solver is not None and canonical_solver(solver, solver_options) != made_for:
        bad.append(f"it was made for solver {plan.solver!r}, requested {solver!r}")
    if solver_options is not None and dict(solver_options) != dict(plan.solver_options):
        bad.append(f"it was made with solver options {plan.solver_options!r}, requested {dict(solver_options)!r}")
    if nfe is not None and int(nfe) != plan.nfe:
        bad.append(f"it was made for NFE {plan.nfe}, requested {nfe}")
    if isinstance(schedule, str):
        made = plan.meta.get("schedule", plan.schedule)
        if schedule != made:
            bad.append(f"it was made for the {made!r} schedule, requested {schedule!r}")
    rec = _recorded_conditioning(plan.meta)
    if rec is not None and float(rec.get("guidance_scale", 1.0)) != pm.guidance_scale:
        bad.append(f"it was made for guidance scale {float(rec.get('guidance_scale', 1.0)):g}, "
                   f"requested {pm.guidance_scale:g}")
    embedded = getattr(pm, "embedded_guidance", None)
    if rec is not None and rec.get("embedded_guidance") is not None and rec["embedded_guidance"] != embedded:
        bad.append(f"it was made for embedded guidance (FLUX guidance_scale) {float(rec['embedded_guidance']):g}, "
                   f"requested {embedded}")
    if flow_call is not None and not bad:
        bad += _flow_mismatch(plan, flow_call[0], pm, flow_call[1], flow_call[2])
    if bad:
        raise ValueError("calibration does not match this pipeline run: " + "; ".join(bad))
    if schedule is not None and not isinstance(schedule, str):
        check_plan(plan, schedule, solver=plan.solver, solver_options=plan.solver_options, what="schedule")
    fp = plan.meta.get("fingerprint")
    if fp is not None:
        here = model_fingerprint(pm.spec())
        if fp != here:
            net = pm.name.removeprefix("diffusers:")
            raise ValueError(f"calibration was made for another model: its fingerprint is {fp}, this pipeline's {net} "
                             f"(weights, latent shape {pm.sample_shape}, noise process) gives {here}")
    return plan


def _plain_plan(pipe: Any, pm: PipelineModel, size: tuple[int, int] | None, solver: str, nfe: int,
                schedule: str | Sequence[float] | torch.Tensor | None, rho: float,
                solver_options: dict | None) -> tuple[SamplingPlan, Any, float | None]:
    """:func:`sample_pipeline`'s plain plan, with the scheduler and ``mu`` of a flow pipeline (else ``None``).  UNet
    pipelines (``size`` ``None``) and explicit sigmas: :func:`~steindiff.plan.make_plan` (default ``karras``).  Flow
    pipelines with a named schedule (default ``flow``): the levels :class:`SteinDiffScheduler` steps this call with,
    from the pipeline's scheduler config at ``size`` pixels (:func:`~.diffusers_scheduler.pipeline_plan`), over the
    steps that fit ``nfe``."""
    if size is None or (schedule is not None and not isinstance(schedule, str)):
        sched = DEFAULT_SCHEDULE if schedule is None else schedule
        return _base_plan(pm.process, solver, nfe, sched, rho, solver_options), None, None
    steps = steps_for_nfe(get_solver(solver, **(solver_options or {})), nfe)
    sched, plan, mu = pipeline_plan(pipe, steps, solver=solver, schedule=schedule, rho=rho,
                                    solver_options=solver_options, height=size[0], width=size[1])
    if repr(sched.process) != repr(pm.process):
        raise RuntimeError(f"internal: the pipeline model's process {pm.process!r} is not the scheduler's "
                           f"{sched.process!r}")
    return plan, sched, mu


def _refuse_arguments(pipe: Any, kind: str, **given: Any) -> None:
    """Refuse the arguments (given as not ``None``) that a ``kind`` pipeline does not take, naming them."""
    named = [k for k, v in given.items() if v is not None]
    if named:
        raise ValueError(f"{', '.join(named)} {'does' if len(named) == 1 else 'do'} not apply to "
                         f"{type(pipe).__name__} ({kind})")


def sample_pipeline(
    pipe: Any,
    *,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    negative_class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
    solver: str | None = None,
    nfe: int | None = None,
    schedule: str | Sequence[float] | torch.Tensor | None = None,
    rho: float = 7.0,
    stabilizer: Stabilizer | str | None = None,
    calibration: Calibration | None = None,
    calibration_dir: str | os.PathLike | None = None,
    calibrate: bool | str = "if-quick",
    calibration_options: dict | None = None,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    output_type: Literal["latent", "pt", "np", "pil"] = "pt",
    dtype: torch.dtype = torch.float32,
    timestep: Literal["interp", "round"] = "interp",
    solver_options: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> PipelineSample:
    """Sample a diffusers pipeline with a steindiff solver and stabilizer, or with a calibrated sampler: a UNet
    pipeline (``unet`` and ``scheduler``, optionally ``vae``: Stable Diffusion and its relatives) or a flow one
    (``transformer`` and a flow-matching ``scheduler``: Stable Diffusion 3, FLUX).

    Conditioning and guidance: the keyword arguments of :func:`~.diffusers_flow.encode_prompts`, so
    ``sample_pipeline(pipe, **encode_prompts(pipe, prompts, guidance_scale=g), guidance_scale=g)`` works for every
    kind.  UNet pipelines: as :func:`pipeline_model` (``prompt_embeds``, ``class_labels`` and their negatives).  Flow
    pipelines: as :func:`~.diffusers_flow.flow_pipeline_model` (``prompt_embeds`` and ``pooled_prompt_embeds``, their
    negatives for SD3's classifier-free guidance; FLUX: ``text_ids``, and ``guidance_scale`` is its embedded
    guidance).  Batch: ``latents.shape[0]``, else ``batch_size``, else the conditioning's batch, else 1.
    ``height``/``width``: the image size in pixels (default: the pipeline's, or, for a UNet or SD3, the size of
    ``latents``).

    ``latents``: as passed to the pipeline, i.e. the noise it starts from: unit-variance noise (UNet: the VP
    latent at ``sigma_max``, before ``init_noise_sigma``; flow: ``x_t`` at ``t = 1``; FLUX: packed, ``(B, tokens,
    4 C)``); converted to VE by dividing by ``alpha(sigma_max)``.  Without them they are drawn as the pipeline draws
    them (``randn_tensor`` in the UNet's dtype, in the prompt embeddings' for a flow pipeline; FLUX packs them),
    from ``generator`` or ``seed`` (default 0).
    ``solver`` (default ``dpmpp_2m``) and ``nfe`` (model passes, default 10) make the plain plan over ``schedule``:
    UNet pipelines ``karras`` (default), ``logsnr``, ``time``; flow pipelines ``flow`` (default: the levels
    :class:`~.diffusers_scheduler.SteinDiffScheduler` steps this pipeline call with, from the pipeline's scheduler
    config: its shift, or FLUX's resolution shift ``mu`` for this image size; see
    :func:`~.diffusers_scheduler.pipeline_plan`), or ``karras``, ``logsnr``, ``time`` over the range of those
    levels; for both, explicit VE sigmas.  ``stabilizer``: a stabilizer object or name
    (:func:`steindiff.stabilizers.make_stabilizer`); ``"auto"``, when it is the calibrated sampler
    (:data:`steindiff.stabilizers.registry.AUTO`), calibrates the plain plan over this call's conditioning
    (:func:`steindiff.calibration.calibrated_plan`, as :func:`calibrate_pipeline` does; cache ``calibration_dir``;
    ``calibrate``: when a missing calibration is fitted, ``"if-quick"`` by default, as every entry point:
    :data:`steindiff.calibration.CALIBRATE_WHEN`; ``False`` only reads the cache; ``calibration_options`` go to
    :func:`steindiff.calibration.calibrate`).
    ``calibration``: a calibrated sampler to apply (a :class:`~steindiff.plan.SamplingPlan` from
    :func:`calibrate_pipeline` or ``stabilizer="auto"``, a :class:`~steindiff.stabilizers.schedule.GammaSchedule`
    or the path of a calibration file, e.g. one saved by ``SteinDiffScheduler.save_calibration``): its solver, noise
    levels and gammas are used; ``solver``, ``nfe``, ``schedule`` and ``solver_options``, when given, must agree
    with it, and its guidance scale and model fingerprint must be this run's; for a flow pipeline also its
    resolution shift ``mu`` and the plain levels it was fitted from (ValueError naming both values otherwise).  Not
    together with ``stabilizer``.
    ``output_type``: ``latent`` (no decoding), ``pt``, ``np`` or ``pil`` (decoded through ``pipe.vae`` as the
    pipeline decodes, ``vae.decode(latents / scaling_factor + shift_factor)``, FLUX's latents unpacked first, then
    mapped from [-1, 1] to [0, 1]).

    Refused with a ValueError naming it: a pipeline with neither a UNet nor a supported transformer, arguments of
    the other kind of pipeline, and latents whose shape is not that of the image size.
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    refuse_with_stabilizer(calibration, stabilizer)
    flux = False
    if getattr(pipe, "transformer", None) is not None:
        check_flow_pipeline(pipe)  # a transformer of another kind is refused, naming it
        flux = _is_flux(pipe)
        _refuse_arguments(pipe, "a flow pipeline, conditioned by prompt embeddings", class_labels=class_labels,
                          negative_class_labels=negative_class_labels,
                          **({} if flux else {"text_ids": text_ids}))
        if timestep != "interp":
            raise ValueError(f"timestep={timestep!r} applies to UNet pipelines: a flow transformer takes continuous "
                             "times")
        if prompt_embeds is None or pooled_prompt_embeds is None:
            raise ValueError(f"{type(pipe).__name__} needs prompt_embeds and pooled_prompt_embeds, e.g. "
                             "**encode_prompts(pipe, prompts, guidance_scale=...)")
        if latents is not None and latents.ndim == 4 and not flux and height is None and width is None:
            f = int(getattr(pipe, "vae_scale_factor", 8))
            height, width = int(latents.shape[2]) * f, int(latents.shape[3]) * f
        size: tuple[int, int] | None = image_size(pipe, height, width)
        cfg = dict(pipe.scheduler.config)  # a SteinDiffScheduler's config keeps where it takes t = 1
        t_max = float(cfg["flow_t_max"]) if cfg.get("process") == "flow" else 1.0 - FLOW_T_DELTA
        pm = flow_pipeline_model(pipe, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                                 negative_prompt_embeds=negative_prompt_embeds,
                                 negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                                 guidance_scale=guidance_scale, height=size[0], width=size[1], text_ids=text_ids,
                                 t_max=t_max)
        latent_dtype = torch.as_tensor(prompt_embeds).dtype  # the pipelines draw their noise in this dtype
    else:
        _refuse_arguments(pipe, "a UNet pipeline", pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, text_ids=text_ids)
        size = None
        shape = None if latents is None else tuple(latents.shape[1:])
        if shape is None and height is not None and width is not None and getattr(pipe, "unet", None) is not None:
            f = int(getattr(pipe, "vae_scale_factor", 8))
            shape = (int(pipe.unet.config.in_channels), int(height) // f, int(width) // f)
        pm = pipeline_model(pipe, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                            class_labels=class_labels, negative_class_labels=negative_class_labels,
                            guidance_scale=guidance_scale, timestep=timestep, sample_shape=shape)
        latent_dtype = getattr(pipe.unet, "dtype", torch.float32)
    if latents is not None and tuple(latents.shape[1:]) != tuple(pm.sample_shape):
        where = f"{size[0]}x{size[1]} pixels" if size is not None else f"height={height}, width={width}"
        raise ValueError(f"latents of shape {tuple(latents.shape[1:])} per sample do not match the image size "
                         f"({where}), whose latents are {tuple(pm.sample_shape)}: pass height and width")

    sched = mu = None
    if calibration is not None:
        plan = _applied_plan(pm, calibration, solver=solver, nfe=nfe, schedule=schedule, solver_options=solver_options,
                             flow_call=None if size is None else (pipe, size, rho))
        stabilizer = plan.stabilizer()
    else:
        plan, sched, mu = _plain_plan(pipe, pm, size, solver or DEFAULT_SOLVER, DEFAULT_NFE if nfe is None else nfe,
                                      schedule, rho, solver_options)
        if registry.resolves_to_calibrated(stabilizer):
            # the calibration's dtype is its own option (calibration_options), not the state's
            plan = _calibrated(pm, plan, cache_dir=calibration_dir, calibrate_missing=calibrate, dtype=None,
                               progress=progress, notice=_stderr_notice, options=calibration_options or {})
            if sched is not None and plan.gammas is not None:  # what SteinDiffScheduler checks a calibration against
                plan.meta["pipeline"] = {**_pipeline_record(pipe, sched, pm, size[0], size[1], mu, guidance_scale),
                                         "num_inference_steps": plan.steps}
            stabilizer = plan.stabilizer()
        elif isinstance(stabilizer, str):
            stabilizer = registry.make_stabilizer(stabilizer)
    sigmas = plan.sigmas

    # batch size and conditioning
    if latents is not None:
        n = latents.shape[0]
    elif batch_size is not None:
        n = int(batch_size)
    else:
        n = pm.batch or 1
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    extra_args = pm.extra_args(n)

    # initial state, VE coordinates
    net = getattr(pipe, "transformer", None) or pipe.unet
    device = getattr(net, "device", torch.device("cpu"))
    if latents is None:
        latents = _draw_latents(pipe, pm, n, size if flux else None, generator, seed, device, latent_dtype)
    x = latents.to(device=device, dtype=dtype) * pm.process.prior_scale(float(sigmas[0]))

    res = sample(pm.model, x, sigmas, plan.get_solver(), stabilizer=stabilizer, extra_args=extra_args,
                 callback=callback, progress=progress, dtype=dtype)
    out_latents = pm.process.to_vp(res.x, float(sigmas[-1]))
    images = _decode(pipe, out_latents, output_type, unpack=size if flux else None)
    return PipelineSample(images, out_latents, sigmas, res.nfe, res.extra_passes, res.trace, res.wall_s, plan)


def _draw_latents(pipe: Any, pm: PipelineModel, n: int, flux_size: tuple[int, int] | None,
                  generator: torch.Generator | None, seed: int | None, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """The noise a pipeline starts from, drawn as its ``prepare_latents`` draws it: ``randn_tensor`` of the latent
    shape; FLUX (``flux_size``: the image size) draws ``(n, C, h, w)`` and packs it to ``(n, tokens, 4 C)``."""
    from diffusers.utils.torch_utils import randn_tensor

    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
    if flux_size is None:
        return randn_tensor((n, *pm.sample_shape), generator=generator, device=device, dtype=dtype)
    c = int(pipe.transformer.config.in_channels) // 4
    h, w = _latent_hw(pipe, *flux_size)
    z = randn_tensor((n, c, h, w), generator=generator, device=device, dtype=dtype)
    return pipe._pack_latents(z, n, c, h, w)


def _decode(pipe: Any, latents: torch.Tensor, output_type: str, unpack: tuple[int, int] | None = None) -> Any:
    """The pipeline's decoding of its final latents: ``unpack`` (FLUX: the image size) unpacks them first
    (``pipe._unpack_latents``), then ``vae.decode(latents / scaling_factor + shift_factor)``, mapped to [0, 1]."""
    if output_type == "latent":
        return latents
    vae = getattr(pipe, "vae", None)
    with torch.no_grad():
        if unpack is not None:
            latents = pipe._unpack_latents(latents, unpack[0], unpack[1], pipe.vae_scale_factor)
        if vae is not None:
            vcfg = vae.config
            z = latents.to(getattr(vae, "dtype", latents.dtype)) / float(vcfg.get("scaling_factor", 1.0) or 1.0)
            if vcfg.get("shift_factor") is not None:
                z = z + float(vcfg["shift_factor"])
            img = vae.decode(z).sample
        else:
            img = latents
        img = (img.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return img
    arr = img.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    arr8 = (arr * 255).round().astype("uint8")
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr8]
