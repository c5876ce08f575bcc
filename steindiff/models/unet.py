"""A small U-Net for small images (8x8 digits and the like), trained with EDM preconditioning.

``UNet(x, noise_labels, class_labels=None)`` maps a ``(B, C, H, W)`` input and a per-sample noise
label (EDM: ``c_noise = log(sigma)/4`` from :class:`~steindiff.models.EDMPrecond`; VP: the
timestep from :class:`~steindiff.models.VPDenoiser`) to a ``(B, C, H, W)`` output.

Design (after the DDPM++/ADM family, scaled down): Fourier or sinusoidal embedding of the noise
label, an MLP, residual blocks with GroupNorm + SiLU + 3x3 convolutions and an additive embedding
projection, average-pool downsampling, nearest upsampling, optional self-attention per level,
zero-initialized output layers.  Every operation is out-of-place and supports reverse- and
forward-mode autodiff (``torch.func.vjp``/``jvp``), so a Stein estimator can differentiate the
denoiser with respect to its input.  Attention is written with plain matmul/softmax for that reason.

``H`` and ``W`` must be divisible by ``2 ** (len(channel_mult) - 1)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "UNetConfig"]

EMBEDDINGS = ("fourier", "positional")


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet` (stored in a checkpoint's ``config.json``)."""

    in_channels: int = 1
    model_channels: int = 32
    channel_mult: Sequence[int] = (1, 2, 2)
    num_blocks: int = 1
    attn_levels: Sequence[int] = (2,)
    dropout: float = 0.0
    embedding: str = "fourier"
    fourier_scale: float = 16.0
    num_classes: int = 0
    groups: int = 8

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attn_levels = tuple(int(a) for a in self.attn_levels)
        if self.in_channels < 1 or self.model_channels < 1 or self.num_blocks < 1:
            raise ValueError("in_channels, model_channels and num_blocks must be >= 1")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {self.channel_mult}")
        if any(not 0 <= a < len(self.channel_mult) for a in self.attn_levels):
            raise ValueError(f"attn_levels {self.attn_levels} must index the levels 0..{len(self.channel_mult) - 1}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for m in self.channel_mult:
            ch = self.model_channels * m
            if ch % min(self.groups, ch):
                raise ValueError(f"channels {ch} not divisible by GroupNorm groups {self.groups}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"], d["attn_levels"] = list(self.channel_mult), list(self.attn_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown U-Net config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, ch), ch, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class NoiseEmbedding(nn.Module):
    """``[cos(2 pi f c), sin(2 pi f c)]`` with random Gaussian ``f`` (Fourier, NCSN++) or
    ``[cos(f c), sin(f c)]`` with ``f = 10000^(-i/half)`` (positional, DDPM)."""

    def __init__(self, dim: int, kind: str, scale: float):
        super().__init__()
        half = dim // 2
        if kind == "fourier":
            g = torch.Generator().manual_seed(0)
            freqs = 2 * math.pi * scale * torch.randn(half, generator=g)
        else:
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = c.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) * (1 / math.sqrt(2))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels (plain matmul + softmax: forward-AD friendly)."""

    def __init__(self, ch: int, groups: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        att = torch.softmax(torch.einsum("bncq,bnck->bnqk", q, k) / math.sqrt(c // self.heads), dim=-1)
        out = torch.einsum("bnqk,bnck->bncq", att, v).reshape(b, c, h, w)
        return (x + self.proj(out)) * (1 / math.sqrt(2))


class UNet(nn.Module):
    """Small U-Net ``F(x, noise_labels, class_labels=None) -> (B, C, H, W)``; see the module doc.

    ``class_labels``: ``None`` (unconditional; uses the null class of a class-conditional model),
    integer labels ``(B,)`` in ``[0, num_classes)`` (``num_classes`` means "no class") or one-hot /
    soft labels ``(B, num_classes)``.  Passing labels to an unconditional model is an error.
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a UNetConfig or keyword arguments, not both")
        self.config = cfg = config
        mc, g = cfg.model_channels, cfg.groups
        emb_dim = 4 * mc
        self.map_noise = NoiseEmbedding(mc, cfg.embedding, cfg.fourier_scale)
        self.map_layer0 = nn.Linear(2 * (mc // 2), emb_dim)
        self.map_layer1 = nn.Linear(emb_dim, emb_dim)
        self.map_label = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes > 0 else None
        self.conv_in = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [mc]
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            blocks = nn.ModuleList()
            if level > 0:
                blocks.append(nn.AvgPool2d(2))
                skips.append(ch)
            for _ in range(cfg.num_blocks):
                blocks.append(ResBlock(ch, mc * mult, emb_dim, g, cfg.dropout))
                ch = mc * mult
                if level in cfg.attn_levels:
                    blocks.append(Attention(ch, g))
                skips.append(ch)
            self.down.append(blocks)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, g, cfg.dropout), Attention(ch, g),
                                  ResBlock(ch, ch, emb_dim, g, cfg.dropout)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            mult = cfg.channel_mult[level]
            blocks = nn.ModuleList()
            for _ in range(cfg.num_blocks + 1):
                blocks.append(ResBlock(ch + skips.pop(), mc * mult, emb_dim, g, cfg.dropout))
                ch = mc * mult
                if level in cfg.attn_levels:
                    blocks.append(Attention(ch, g))
            if level > 0:
                blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                blocks.append(nn.Conv2d(ch, ch, 3, padding=1))
            self.up.append(blocks)
        self.norm_out = _norm(ch, g)
        self.conv_out = _zero(nn.Conv2d(ch, cfg.in_channels, 3, padding=1))

    @property
    def factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    def _label_embedding(self, class_labels: Any, batch: int, device: torch.device,
                         dtype: torch.dtype) -> torch.Tensor | None:
        ncls = self.config.num_classes
        if self.map_label is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional U-Net (num_classes = 0)")
            return None
        if class_labels is None:
            idx = torch.full((batch,), ncls, dtype=torch.long, device=device)
            return self.map_label(idx)
        labels = torch.as_tensor(class_labels, device=device)
        if labels.ndim == 0:
            labels = labels.expand(batch)
        if labels.is_floating_point():  # one-hot / soft labels (B, num_classes)
            if labels.shape != (batch, ncls):
                raise ValueError(f"float class_labels must have shape ({batch}, {ncls}), got {tuple(labels.shape)}")
            return labels.to(dtype) @ self.map_label.weight[:ncls]
        if labels.shape != (batch,):
            raise ValueError(f"integer class_labels must have shape ({batch},), got {tuple(labels.shape)}")
        # checked when sampling; training labels were checked by the data loader (and reading them
        # back from a GPU every iteration would synchronise it)
        if not (self.training and labels.device.type != "cpu") and (labels.min() < 0 or labels.max() > ncls):
            raise ValueError(f"class labels must be in [0, {ncls}] ({ncls} = unconditional)")
        return self.map_label(labels.long())

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Any = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet expects (B, {self.config.in_channels}, H, W) input, got {tuple(x.shape)}")
        b, _, h, w = x.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} must be divisible by {self.factor} (2^(levels-1))")
        noise_labels = torch.as_tensor(noise_labels, device=x.device)
        if noise_labels.ndim == 0:
            noise_labels = noise_labels.expand(b)
        noise_labels = noise_labels.reshape(-1)
        if noise_labels.shape[0] != b:
            raise ValueError(f"noise_labels must have one entry per sample ({b}), got {noise_labels.shape[0]}")
        emb = self.map_layer0(self.map_noise(noise_labels).to(x.dtype))
        lab = self._label_embedding(class_labels, b, x.device, x.dtype)
        if lab is not None:
            emb = emb + lab
        emb = F.silu(self.map_layer1(F.silu(emb)))

        hs = [self.conv_in(x)]
        h_ = hs[0]
        for blocks in self.down:
            for blk in blocks:
                h_ = blk(h_, emb) if isinstance(blk, ResBlock) else blk(h_)
                if not isinstance(blk, Attention):
                    hs.append(h_)
                else:
                    hs[-1] = h_
        for blk in self.mid:
            h_ = blk(h_, emb) if isinstance(blk, ResBlock) else blk(h_)
        for blocks in self.up:
            for blk in blocks:
                if isinstance(blk, ResBlock):
                    h_ = blk(torch.cat([h_, hs.pop()], dim=1), emb)
                else:
                    h_ = blk(h_)
        return self.conv_out(F.silu(self.norm_out(h_)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
