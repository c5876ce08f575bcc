"""Tiny diffusers pipelines built offline from configs (random weights, a character-level CLIP tokenizer written
here): Stable Diffusion, Stable Diffusion 3 and FLUX, text-to-image and image-to-image.  They carry no quality
signal; they run the pipelines' own code in a few milliseconds per model call."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

DTYPE = torch.float64
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def tokenizer(max_length: int = 8):
    """A CLIP tokenizer over single characters (no merges), written to a temporary folder and loaded."""
    from transformers import CLIPTokenizer

    d = Path(tempfile.mkdtemp(prefix="steindiff-tok-"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=max_length)


def _clip_config(**kw):
    from transformers import CLIPTextConfig

    cfg = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
               layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=100, hidden_act="gelu",
               projection_dim=32, max_position_embeddings=16)
    cfg.update(kw)
    return CLIPTextConfig(**cfg)


def _vae(latent_channels: int, levels: int = 1, **kw):
    """A VAE of ``levels`` levels: images ``2**(levels - 1)`` times the latents' size."""
    import diffusers

    torch.manual_seed(2)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,) * levels, layers_per_block=1,
                                   down_block_types=("DownEncoderBlock2D",) * levels,
                                   up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=latent_channels,
                                   norm_num_groups=1, sample_size=8, **kw)


def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=1, eos_token_id=1))


def stable_diffusion_scheduler():
    """Stable Diffusion's own scheduler config (PNDM, scaled-linear betas)."""
    import diffusers

    return diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   skip_prk_steps=True, steps_offset=1)


def flow_scheduler(kind: str):
    """The flow scheduler of SD3 (static shift 3) or FLUX (dynamic shifting)."""
    import diffusers

    if kind == "sd3":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def _done(pipe):
    pipe = pipe.to(DTYPE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stable_diffusion(img2img: bool = False, scheduler=None):
    """StableDiffusionPipeline (or its img2img pipeline): a cross-attention UNet on 4x8x8 latents (8x8 pixels with a
    one-level VAE), a 2-layer CLIP text encoder, Stable Diffusion's scaled-linear betas."""
    import diffusers
    from transformers import CLIPTextModel

    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
    torch.manual_seed(3)
    text_encoder = CLIPTextModel(_clip_config())
    sched = scheduler or stable_diffusion_scheduler()
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    return _done(cls(vae=_vae(4), text_encoder=text_encoder, tokenizer=tokenizer(), unet=unet, scheduler=sched,
                     safety_checker=None, feature_extractor=None, requires_safety_checker=False))


def stable_diffusion_3(img2img: bool = False, scheduler=None, image_size: int = 8):
    """StableDiffusion3Pipeline (or img2img): a one-layer SD3 transformer on 4x8x8 latents, two CLIP encoders and a
    small T5, the flow scheduler with SD3's shift 3.  ``image_size`` above 8: a VAE of factor 8 and 2x2 patches
    (512: 64x64 latents, 1024 tokens), the pipeline's default size."""
    import diffusers
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(4)
    big = image_size > 8
    latent = image_size // 8 if big else image_size
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=latent, patch_size=2 if big else 1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=4, pos_embed_max_size=max(16, latent // 2))
    torch.manual_seed(5)
    te1 = CLIPTextModelWithProjection(_clip_config())
    torch.manual_seed(6)
    te2 = CLIPTextModelWithProjection(_clip_config())
    sched = scheduler or flow_scheduler("sd3")
    cls = diffusers.StableDiffusion3Img2ImgPipeline if img2img else diffusers.StableDiffusion3Pipeline
    vae = _vae(4, levels=4 if big else 1, shift_factor=0.06, scaling_factor=1.5)
    return _done(cls(transformer=transformer, scheduler=sched, vae=vae,
                     text_encoder=te1, tokenizer=tokenizer(), text_encoder_2=te2, tokenizer_2=tokenizer(),
                     text_encoder_3=_t5(10), tokenizer_3=tokenizer()))


def flux(scheduler=None):
    """FluxPipeline: a one-layer FLUX transformer (guidance embedding on) on 1x8x8 latents packed to 16 tokens of 4,
    a CLIP and a small T5 encoder, FLUX's dynamic shifting.  Its default image is 8x8 pixels (``default_sample_size``
    8; the real pipeline's 128 would be 4096 tokens here)."""
    import diffusers
    from transformers import CLIPTextModel

    torch.manual_seed(7)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    torch.manual_seed(8)
    clip = CLIPTextModel(_clip_config())
    t5 = _t5(9)
    sched = scheduler or flow_scheduler("flux")
    pipe = diffusers.FluxPipeline(scheduler=sched, vae=_vae(1, shift_factor=0.06, scaling_factor=1.5),
                                  text_encoder=clip, tokenizer=tokenizer(), text_encoder_2=t5,
                                  tokenizer_2=tokenizer(max_length=8), transformer=transformer)
    pipe.default_sample_size = 8
    return _done(pipe)
