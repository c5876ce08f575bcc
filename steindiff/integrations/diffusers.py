"""diffusers models and pipelines with steindiff solvers and stabilizers.

- :func:`denoiser_from_diffusers`: a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``) and
  its scheduler (or scheduler config) to a VE denoiser ``D(x, sigma, **extra)``
  (:class:`~steindiff.models.VPDenoiser` on a :class:`~steindiff.noise.DiscreteVPProcess` built
  from the scheduler's betas).  Extra arguments (``encoder_hidden_states``, ``class_labels``, ...)
  go to the UNet.
- :class:`CFGDenoiser`: classifier-free guidance in VE coordinates,
  ``D = D_u + s (D_c - D_u)``, conditional and unconditional halves in one batched call.
- :func:`sample_pipeline`: sample a diffusers pipeline's UNet with a steindiff solver (and
  stabilizer), decoding through the pipeline's VAE when it has one.

Only VP (DDPM-family) schedulers are supported: DDPM, DDIM, PNDM, Euler, Heun, DPM-Solver, UniPC,
... with ``prediction_type`` ``epsilon``, ``v_prediction`` or ``sample``.  Flow-matching and VE
schedulers are refused with a ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..models.denoisers import VPDenoiser
from ..noise import DiscreteVPProcess, betas_for_schedule
from ..sampling import sample
from ..schedules import get_sigmas, validate_sigmas
from ..solvers import get_solver, steps_for_nfe

__all__ = ["denoiser_from_diffusers", "process_from_scheduler", "CFGDenoiser", "sample_pipeline", "PipelineSample",
           "PREDICTION_TYPE_MAP"]

#: diffusers ``prediction_type`` -> :class:`VPDenoiser` prediction
PREDICTION_TYPE_MAP = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
OUTPUT_TYPES = ("latent", "pt", "np", "pil")


def _config_of(scheduler_or_config: Any) -> tuple[dict, str]:
    """``(config dict, class name)`` of a scheduler or a config mapping."""
    if isinstance(scheduler_or_config, Mapping):
        cfg = dict(scheduler_or_config)
        return cfg, str(cfg.get("_class_name", "") or "")
    cfg = getattr(scheduler_or_config, "config", None)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a diffusers scheduler or its config (a mapping), got {type(scheduler_or_config).__name__}")
    return dict(cfg), type(scheduler_or_config).__name__


def process_from_scheduler(scheduler_or_config: Any) -> DiscreteVPProcess:
    """The discrete VP process (float64 ``alphas_cumprod``) of a diffusers VP scheduler or its config.

    Betas come from ``trained_betas`` or from ``beta_schedule`` (``linear``, ``scaled_linear``,
    ``squaredcos_cap_v2``) with ``beta_start``, ``beta_end`` and ``num_train_timesteps``.  With
    ``rescale_betas_zero_snr`` the last ``alphas_cumprod`` is set to ``2**-24``, as diffusers' Euler
    scheduler does (a terminal SNR of exactly 0 has no VE noise level).  Raises ValueError for flow-matching
    and VE schedulers and for tables that disagree with ``num_train_timesteps`` or with the
    scheduler's own ``alphas_cumprod``.
    """
    cfg, cls = _config_of(scheduler_or_config)
    if "FlowMatch" in cls or cfg.get("use_flow_sigmas") or ("shift" in cfg and "beta_schedule" not in cfg):
        raise ValueError(f"flow-matching scheduler {cls or '(config)'} is not supported: steindiff's diffusers bridge "
                         "needs a VP (DDPM-family) scheduler with a beta schedule")
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
        ac = _zero_snr_alphas_cumprod(ac)
    table = getattr(scheduler_or_config, "alphas_cumprod", None) if not isinstance(scheduler_or_config, Mapping) else None
    if table is not None:
        table = np.asarray(torch.as_tensor(table).detach().cpu().double().numpy())
        if table.shape != ac.shape:
            raise ValueError(f"the scheduler's alphas_cumprod has {table.size} entries but its config gives "
                             f"num_train_timesteps={n}: timestep ranges do not match")
        if not np.allclose(table, ac, rtol=1e-4, atol=1e-6):
            raise ValueError("the scheduler's alphas_cumprod differs from the table its config describes "
                             f"(max abs difference {np.abs(table - ac).max():.3g}); pass a consistent scheduler")
    return DiscreteVPProcess(alphas_cumprod=ac)


def _zero_snr_alphas_cumprod(ac: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Alg. 1 (rescale to zero terminal SNR), then ``abar_T = 2**-24`` (diffusers' Euler)."""
    s = np.sqrt(ac)
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    out = s**2
    out[-1] = 2.0**-24
    return out


class _DiffusersNet(nn.Module):
    """``net(x_vp, t, **extra) = unet(x_vp, timestep=t, **extra).sample``; floating extra tensors are cast
    to the UNet's dtype; a learned-variance output (twice the input channels) keeps its first half."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, **extra: Any) -> torch.Tensor:
        extra = {k: (v.to(x.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in extra.items()}
        out = self.unet(x, timestep=t, **extra)
        out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)
        if out.ndim >= 2 and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]
        return out


def denoiser_from_diffusers(
    unet: nn.Module,
    scheduler_or_config: Any,
    *,
    dtype: torch.dtype | None = None,
    timestep: Literal["interp", "round"] = "interp",
) -> VPDenoiser:
    """A VE denoiser ``D(x, sigma, **extra)`` for a diffusers UNet trained with ``scheduler_or_config``.

    The UNet sees ``x_vp = x / sqrt(1 + sigma^2)`` and the timestep of ``sigma`` on the scheduler's
    table (``timestep="interp"``: fractional, as diffusers' Euler/Heun schedulers; ``"round"``: the
    nearest integer, as DPM-Solver/UniPC with Karras sigmas).  ``extra`` keyword arguments go to the
    UNet (``encoder_hidden_states`` for ``UNet2DConditionModel``, ``class_labels``, ...).
    ``dtype``: the UNet's input dtype (default: its parameters' dtype).  The result's ``process`` is
    the scheduler's :class:`~steindiff.noise.DiscreteVPProcess` (for schedules and prior noise).
    """
    cfg, cls = _config_of(scheduler_or_config)
    pred = cfg.get("prediction_type", "epsilon")
    process = process_from_scheduler(scheduler_or_config)
    if pred not in PREDICTION_TYPE_MAP:
        raise ValueError(f"unsupported prediction_type {pred!r} of scheduler {cls or '(config)'}; "
                         f"supported: {', '.join(PREDICTION_TYPE_MAP)}")
    unet_cfg = getattr(unet, "config", None)
    unet_n = unet_cfg.get("num_train_timesteps") if isinstance(unet_cfg, Mapping) else None
    if unet_n is not None and int(unet_n) != process.num_train_timesteps:
        raise ValueError(f"the UNet was built for num_train_timesteps={unet_n} but the scheduler's table has "
                         f"{process.num_train_timesteps} timesteps")
    if dtype is None:
        dtype = getattr(unet, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            p = next(iter(unet.parameters()), None) if isinstance(unet, nn.Module) else None
            dtype = p.dtype if p is not None else None
    den = VPDenoiser(_DiffusersNet(unet), process, PREDICTION_TYPE_MAP[pred], timestep=timestep, dtype=dtype)
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


class CFGDenoiser(nn.Module):
    """Classifier-free guidance in VE coordinates: ``D = D_u + s (D_c - D_u)`` (Ho & Salimans 2022).

    ``cond``/``uncond``: the conditional and unconditional extra arguments of ``denoiser``, either a
    tensor (passed as ``cond_key``, default ``encoder_hidden_states``) or a dict of keyword
    arguments (e.g. ``{"class_labels": labels}``).  Tensors of batch 1 (or a divisor of the batch)
    are repeated to the batch.  With ``batched=True`` both halves go through one model call of
    twice the batch (counted as one pass); ``scale == 1`` calls the conditional model only.  Pure
    tensor algebra, so a stabilizer differentiates through it.  For epsilon- and v-prediction models
    it equals diffusers' guidance on the network output (``D`` is affine in it at fixed ``x``).
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], scale: float, cond: Any, uncond: Any = None, *,
                 cond_key: str = "encoder_hidden_states", batched: bool = True):
        super().__init__()
        self.denoiser, self.scale, self.batched = denoiser, float(scale), batched
        self.cond, self.uncond = _as_cond(cond, cond_key), _as_cond(uncond, cond_key)
        if self.scale != 1.0:
            if uncond is None:
                raise ValueError(f"guidance scale {self.scale} needs the unconditional arguments (uncond)")
            if set(self.cond) != set(self.uncond):
                raise ValueError(f"cond and uncond must have the same keys, got {sorted(self.cond)} and {sorted(self.uncond)}")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(n)
        cond = {k: _batch_to(v, n, f"cond[{k!r}]") for k, v in self.cond.items()}
        if self.scale == 1.0:
            return self.denoiser(x, sigma, **cond, **extra)
        uncond = {k: _batch_to(v, n, f"uncond[{k!r}]") for k, v in self.uncond.items()}
        if not self.batched:
            d_u = self.denoiser(x, sigma, **uncond, **extra)
            d_c = self.denoiser(x, sigma, **cond, **extra)
        else:
            both = {k: (torch.cat([uncond[k], cond[k]]) if isinstance(cond[k], torch.Tensor) and cond[k].ndim > 0 else cond[k])
                    for k in cond}
            ex = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v)
                  for k, v in extra.items()}
            d_u, d_c = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **ex).chunk(2)
        return d_u + self.scale * (d_c - d_u)


@dataclass
class PipelineSample:
    """Output of :func:`sample_pipeline`.

    ``images``: as ``output_type`` asks (``latent``: the final latents; ``pt``: ``(B, C, H, W)`` in
    [0, 1]; ``np``: ``(B, H, W, C)`` float32 in [0, 1]; ``pil``: a list of PIL images).
    ``latents``: the final latents (VP coordinates at ``sigmas[-1]``; at ``sigma = 0`` the clean latents),
    before the VAE's scaling.
    """

    images: Any
    latents: torch.Tensor
    sigmas: torch.Tensor
    nfe: int
    extra_passes: int = 0
    trace: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


def _sample_shape(unet: Any) -> tuple[int, ...]:
    cfg = getattr(unet, "config", None)
    if not isinstance(cfg, Mapping) or cfg.get("in_channels") is None or cfg.get("sample_size") is None:
        raise ValueError("cannot infer the latent shape from the UNet config (in_channels, sample_size); pass latents")
    size = cfg["sample_size"]
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    return (int(cfg["in_channels"]), *hw)


def sample_pipeline(
    pipe: Any,
    *,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    negative_class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    batch_size: int | None = None,
    solver: str = "dpmpp_2m",
    nfe: int = 10,
    schedule: str | Sequence[float] | torch.Tensor = "karras",
    rho: float = 7.0,
    stabilizer: Any | None = None,
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
    """Sample a diffusers pipeline (anything with ``unet`` and ``scheduler``, optionally ``vae``) with a
    steindiff solver and stabilizer.

    Conditioning: ``prompt_embeds`` (passed as ``encoder_hidden_states``) and/or ``class_labels``;
    with ``guidance_scale > 1`` (diffusers' convention) classifier-free guidance needs
    ``negative_prompt_embeds`` / ``negative_class_labels`` (no text encoder is run here).
    Batch: ``latents.shape[0]``, else ``batch_size``, else the conditioning's batch, else 1.

    ``latents``: as passed to a diffusers pipeline, i.e. unit-variance noise (the VP latent at
    ``sigma_max``, before ``init_noise_sigma``); converted to VE by dividing by ``alpha(sigma_max)``.
    Without them they are drawn as diffusers draws them (``randn_tensor(shape, generator, dtype=unet.dtype)``),
    from ``generator`` or ``seed`` (default 0).
    ``schedule``: ``karras``, ``logsnr``, ``time`` (with ``nfe`` model passes per sample) or explicit VE
    sigmas.  ``stabilizer``: a stabilizer object or name (:func:`steindiff.stabilizers.make_stabilizer`).
    ``output_type``: ``latent`` (no decoding), ``pt``, ``np`` or ``pil`` (decoded through ``pipe.vae``
    as ``vae.decode(latents / scaling_factor)`` when the pipeline has a VAE, then mapped from [-1, 1] to [0, 1]).
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    unet = getattr(pipe, "unet", None)
    scheduler = getattr(pipe, "scheduler", None)
    if unet is None or scheduler is None:
        raise ValueError("the pipeline needs a `unet` and a `scheduler` (transformer-based pipelines are not supported)")
    den = denoiser_from_diffusers(unet, scheduler, timestep=timestep)
    process = den.process
    solver_obj = get_solver(solver, **(solver_options or {}))
    if isinstance(schedule, str):
        sigmas = get_sigmas(schedule, steps_for_nfe(solver_obj, nfe), process, rho=rho)
    else:
        sigmas = validate_sigmas(schedule)
    if isinstance(stabilizer, str):
        from ..stabilizers import make_stabilizer

        stabilizer = make_stabilizer(stabilizer)

    # batch size and conditioning
    class_labels = None if class_labels is None else torch.as_tensor(class_labels)
    negative_class_labels = None if negative_class_labels is None else torch.as_tensor(negative_class_labels)
    n = None
    if latents is not None:
        n = latents.shape[0]
    elif batch_size is not None:
        n = int(batch_size)
    else:
        for c in (prompt_embeds, class_labels):
            if isinstance(c, torch.Tensor) and c.ndim > 0:
                n = c.shape[0]
                break
    n = 1 if n is None else n
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    cond: dict = {}
    uncond: dict = {}
    if prompt_embeds is not None:
        cond["encoder_hidden_states"] = prompt_embeds
        uncond["encoder_hidden_states"] = negative_prompt_embeds
    if class_labels is not None:
        cond["class_labels"] = class_labels
        uncond["class_labels"] = negative_class_labels
    device = getattr(unet, "device", torch.device("cpu"))
    cond = {k: _batch_to(torch.as_tensor(v).to(device), n, k) for k, v in cond.items()}
    if guidance_scale > 1.0:
        if not cond:
            raise ValueError("guidance_scale > 1 needs conditioning (prompt_embeds or class_labels)")
        missing = [("negative_prompt_embeds" if k == "encoder_hidden_states" else "negative_class_labels")
                   for k, v in uncond.items() if v is None]
        if missing:
            raise ValueError(f"guidance_scale={guidance_scale} needs {', '.join(missing)} "
                             "(the unconditional inputs, e.g. the encoded empty prompt or the null class)")
        uncond = {k: _batch_to(torch.as_tensor(v).to(device), n, "negative " + k) for k, v in uncond.items()}
        model: Callable[..., torch.Tensor] = CFGDenoiser(den, guidance_scale, cond, uncond)
        extra_args: dict = {}
    else:
        model, extra_args = den, cond

    # initial state, VE coordinates
    shape = (n, *_sample_shape(unet)) if latents is None else tuple(latents.shape)
    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
        latents = randn_tensor(shape, generator=generator, device=device, dtype=getattr(unet, "dtype", torch.float32))
    x = latents.to(device=device, dtype=dtype) * math.sqrt(1.0 + float(sigmas[0]) ** 2)

    res = sample(model, x, sigmas, solver_obj, stabilizer=stabilizer, extra_args=extra_args, callback=callback,
                 progress=progress, dtype=dtype)
    s_last = float(sigmas[-1])
    out_latents = res.x / math.sqrt(1.0 + s_last**2)
    images = _decode(pipe, out_latents, output_type)
    return PipelineSample(images, out_latents, sigmas, res.nfe, res.extra_passes, res.trace, res.wall_s)


def _decode(pipe: Any, latents: torch.Tensor, output_type: str) -> Any:
    if output_type == "latent":
        return latents
    vae = getattr(pipe, "vae", None)
    with torch.no_grad():
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
