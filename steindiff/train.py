"""Train a small U-Net denoiser on images: the training loop (data: :mod:`steindiff.data`, checkpoints:
:mod:`steindiff.models.checkpoint`).

Losses
    ``edm`` (default): Karras et al. 2022, Eq. 8 with their training recipe (Sec. 5, Table 1):
    ``ln sigma ~ N(P_mean, P_std^2)`` (``P_mean = -1.2``, ``P_std = 1.2``), loss weight
    ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``, denoiser ``D = EDMPrecond(UNet)`` with
    ``sd = sigma_data = 0.5``.
    ``vp-eps``: epsilon prediction on a discrete VP process (DDPM, Ho et al. 2020, linear betas,
    1000 steps, uniform timesteps), used through :class:`~steindiff.models.VPDenoiser`.
    ``flow``: rectified flow (Liu et al. 2023; Esser et al. 2024, Stable Diffusion 3, Sec. 2 and 3.1):
    ``x_t = (1 - t) x0 + t eps``, the network ``F(x_t, 1000 t)`` regresses the velocity ``eps - x0`` (plain
    mean squared error), with SD3's logit-normal times ``t = sigmoid(n)``, ``n ~ N(logit_mean, logit_std^2)``
    (SD3: 0 and 1); used through :class:`~steindiff.models.FlowDenoiser` on a
    :class:`~steindiff.noise.FlowProcess`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import DIGITS_HOLDOUT, DataError, ImageDataset, load_dataset, split_indices
from .models import checkpoint as ckpt
from .models.denoisers import edm_coefficients
from .models.unet import UNet, UNetConfig

__all__ = ["TrainConfig", "TrainResult", "train", "LOSSES", "PRECISIONS"]

LOSSES = ("edm", "vp-eps", "flow")
#: The flow process a ``flow`` checkpoint records: the VE noise range of the ``edm`` models, [0.002, 80], so both
#: kinds of model share the Karras and log-SNR schedules.
FLOW_PROCESS = {"type": "flow", "sigma_min": 0.002, "sigma_max": 80.0, "shift": 1.0}
PRECISIONS = ("fp32", "bf16")
LOSS_WINDOW = 200  # the reported loss is the mean of at most this many last iterations


@dataclass
class TrainConfig:
    """Training hyper-parameters (recorded in the checkpoint)."""

    data: str = "digits"
    iters: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    loss: str = "edm"
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    logit_mean: float = 0.0  # flow: t = sigmoid(n), n ~ N(logit_mean, logit_std^2) (SD3's logit-normal)
    logit_std: float = 1.0
    holdout: int | None = None  # None: 297 for digits, 0 otherwise
    split_seed: int = 0
    seed: int = 0
    label_dropout: float = 0.1
    ckpt_every: int = 1000
    time_limit_s: float | None = None
    precision: str = "fp32"  # or "bf16": autocast of the network's forward pass (weights and loss stay float32)
    weights_dtype: str = "float32"  # or "float16": the saved EMA weights (model.safetensors); training stays float32
    log_every: int = 50  # read the losses back from the device (and check them) every this many iterations

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("iters", "batch_size", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0 or not 0 <= self.ema_decay < 1:
            raise ValueError("need lr > 0, warmup >= 0 and 0 <= ema_decay < 1")
        if self.sigma_data <= 0 or self.P_std <= 0 or not self.logit_std > 0:
            raise ValueError("sigma_data, P_std and logit_std must be > 0")
        if self.weights_dtype not in ("float32", "float16"):
            raise ValueError(f"weights_dtype must be float32 or float16, got {self.weights_dtype!r}")
        if self.holdout is not None and self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    out: Path
    step: int
    wall_s: float
    loss: float  # mean training loss of the last ``loss_iters`` iterations
    n_params: int
    config: dict[str, Any]
    stopped_early: bool = False
    loss_iters: int = 0  # the iterations ``loss`` is the mean of: the last LOSS_WINDOW, or all when fewer


def _to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor on the CPU: checkpoints load on any device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def train(cfg: TrainConfig, out: str | os.PathLike, unet: UNetConfig | None = None, *, resume: bool = False,
          progress: bool = True, dataset: ImageDataset | None = None, callback: Callable[[dict], None] | None = None,
          device: str | torch.device | None = None) -> TrainResult:
    """Train (or, with ``resume``, continue training) a U-Net and write checkpoints to ``out``.

    ``device``: where the network, the optimizer and the training images live (default: the
    dataset's device, normally the CPU).  The random streams (batches, noise, noise levels) come
    from a CPU generator and are moved, without a host synchronisation; the losses are read back
    (and checked for NaN) every ``cfg.log_every`` iterations, not every one.  ``cfg.precision``
    ``bf16`` runs the network's forward pass under bf16 autocast.  Checkpoints are written from CPU
    copies and resume on either device.  A ``callback`` gets ``{"step", "loss"}`` after every
    iteration (reading the loss costs one synchronisation per iteration).

    ``resume=True`` continues from ``out/train_state.pt`` up to ``cfg.iters`` total iterations; the
    architecture, loss and data must match.  Without ``resume`` an existing checkpoint at ``out``
    is an error.  Checkpoints are written every ``cfg.ckpt_every`` iterations, at the end, and
    on Ctrl-C.  ``cfg.time_limit_s`` stops early (with a checkpoint) after that many seconds.
    """
    out = Path(out)
    ckpt.recover(out)
    run = _Run(cfg, dataset if dataset is not None else load_dataset(cfg.data), unet, out, device)
    if resume:
        run.restore()
    elif out.exists() and (ckpt.is_checkpoint_dir(out) or (out / ckpt.STATE_FILE).exists()):
        raise FileExistsError(f"{out}: a checkpoint already exists; resume it or choose another folder")
    elif out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder")
    return run.run(progress, callback)


def _architecture(cfg: TrainConfig, ds: ImageDataset, labels: torch.Tensor | None, unet: UNetConfig | None
                  ) -> UNetConfig:
    """The U-Net configuration (default: for the loss and the images' channels), checked against the data."""
    c, h, w = ds.shape
    if unet is None:
        unet = UNetConfig(in_channels=c, embedding="fourier" if cfg.loss == "edm" else "positional")  # flow: 1000 t
    if unet.in_channels != c:
        raise DataError(f"{cfg.data}: images have {c} channel(s) but the U-Net expects {unet.in_channels}")
    f = 2 ** (len(unet.channel_mult) - 1)
    if h % f or w % f:
        raise DataError(f"{cfg.data}: image size {h}x{w} is not divisible by {f}, the U-Net's downsampling; use "
                        f"fewer levels (channel_mult) or images (patches) whose size is a multiple of {f}")
    if unet.num_classes and labels is None:
        raise DataError(f"{cfg.data}: a class-conditional U-Net (num_classes={unet.num_classes}) needs labels")
    if unet.num_classes and labels is not None and int(labels.max()) >= unet.num_classes:
        raise DataError(f"{cfg.data}: label {int(labels.max())} >= num_classes {unet.num_classes}")
    return unet


class _Run:
    """One training run: the data split, the networks (raw and EMA), the optimizer, the random stream
    and the losses; :meth:`run` is the loop."""

    def __init__(self, cfg: TrainConfig, ds: ImageDataset, unet: UNetConfig | None, out: Path,
                 device: str | torch.device | None):
        if ds.holdout is not None:  # the data set's own split (patches: by photo region)
            if cfg.holdout is not None or cfg.split_seed != 0:
                raise DataError(f"{cfg.data}: holds out its own patches (by photo region); leave the holdout "
                                "and its seed unset")
            held_idx = ds.holdout
            train_idx = np.setdiff1d(np.arange(ds.x.shape[0]), held_idx)
            holdout = len(held_idx)
        else:
            holdout = cfg.holdout if cfg.holdout is not None else (DIGITS_HOLDOUT if ds.source == "digits" else 0)
            train_idx, held_idx = split_indices(ds.x.shape[0], holdout, cfg.split_seed)
        self.x = ds.x[torch.from_numpy(train_idx)]
        self.labels = ds.labels[torch.from_numpy(train_idx)] if ds.labels is not None else None
        self.cfg, self.out, self.unet = cfg, out, _architecture(cfg, ds, self.labels, unet)
        self.device = torch.device(device) if device is not None else ds.x.device
        torch.manual_seed(cfg.seed)
        self.net, self.ema = UNet(self.unet), UNet(self.unet)
        self.ema.load_state_dict(self.net.state_dict())
        self.ema.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.wall_prev, self.losses = 0, 0.0, []
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device) not yet read back
        self.data_info = {
            "source": ds.source, "name": ds.name, "shape": list(ds.shape), "range": [-1.0, 1.0],
            "n_total": int(ds.x.shape[0]), "n_train": int(len(train_idx)), "fingerprint": ds.fingerprint(),
            "holdout": {"n": int(holdout), "seed": int(cfg.split_seed), "indices": [int(i) for i in held_idx],
                        **({"by": "photo region"} if ds.holdout is not None else {})},
            "has_labels": ds.labels is not None,
        }
        if cfg.loss == "edm":
            self.precond = {"type": "edm", "sigma_data": cfg.sigma_data}
            self.process_cfg = {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0}
        elif cfg.loss == "flow":
            self.precond = {"type": "flow", "prediction": "velocity", "time_scale": 1000.0}
            self.process_cfg = dict(FLOW_PROCESS)
        else:
            self.precond = {"type": "vp", "prediction": "epsilon"}
            self.process_cfg = dict(ckpt.VP_PROCESS)
        self.vp = ckpt.make_process(self.process_cfg) if cfg.loss == "vp-eps" else None

    def restore(self) -> None:
        """Continue from the training state in the output folder (same architecture, loss, data and split)."""
        sfile = self.out / ckpt.STATE_FILE
        if not sfile.is_file():
            raise ckpt.CheckpointError(f"{sfile}: nothing to resume from (no training state)")
        try:
            st = torch.load(sfile, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ckpt.CheckpointError(f"{sfile}: corrupt or unreadable training state ({e})") from None
        if st.get("unet") != self.unet.to_dict():
            raise ckpt.CheckpointError(f"{sfile}: architecture differs from the requested one ({st.get('unet')} vs "
                                       f"{self.unet.to_dict()})")
        info = self.data_info
        if (st.get("loss") != self.cfg.loss or st.get("fingerprint") != info["fingerprint"]
                or st.get("holdout") != info["holdout"]["indices"]):
            raise ckpt.CheckpointError(f"{sfile}: was trained with another loss, dataset or split; start a new run in "
                                       "another folder")
        try:
            self.net.load_state_dict(st["model"])
            self.ema.load_state_dict(st["ema"] if st.get("ema") is not None else self._saved_ema())
            self.opt.load_state_dict(st["opt"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{sfile}: training state does not match the model ({e})") from None
        self.gen.set_state(st["gen"])
        torch.set_rng_state(st["rng"])
        if self.device.type == "cuda" and st.get("cuda_rng") is not None:  # dropout's stream, resumed on CUDA
            torch.cuda.set_rng_state(st["cuda_rng"], self.device)
        self.step, self.wall_prev, self.losses = int(st["step"]), float(st["wall_s"]), list(st["losses"])

    def _saved_ema(self) -> dict[str, torch.Tensor]:
        """The EMA weights of ``model.safetensors``: a float32 checkpoint keeps them there only, not twice."""
        from safetensors.torch import load_file

        wfile = self.out / ckpt.WEIGHTS_FILE
        try:
            state = load_file(str(wfile))
        except Exception as e:
            raise ckpt.CheckpointError(f"{wfile}: corrupt or unreadable, and the training state has no copy of "
                                       f"the EMA weights ({e})") from None
        if any(v.is_floating_point() and v.dtype != torch.float32 for v in state.values()):
            raise ckpt.CheckpointError(f"{wfile}: not float32, and the training state has no copy of the EMA weights")
        return state

    def _to_device(self) -> None:
        """Networks, optimizer state (it follows its parameters), images and labels to the run's device."""
        dev = self.device
        self.net.to(dev)
        self.ema.to(dev)
        for group_state in self.opt.state.values():
            for k, v in group_state.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    group_state[k] = v.to(dev)
        self.x = self.x.to(dev)
        self.labels = self.labels.to(dev) if self.labels is not None else None
        self.abar = self.vp.alphas_cumprod.to(dev, torch.float32) if self.vp is not None else None
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)  # no host synchronisation (pageable memory is staged)

    def batch_loss(self) -> torch.Tensor:
        """The loss of one batch; every random number comes from the CPU generator (the same stream on
        any device) and is then moved."""
        cfg, gen, net = self.cfg, self.gen, self.net
        idx = torch.randint(0, self.x.shape[0], (cfg.batch_size,), generator=gen)
        x0 = self.x[self._dev(idx)]
        labels = None
        if self.unet.num_classes:
            labels = self.labels[self._dev(idx)].clone()  # type: ignore[index]
            drop = self._dev(torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout)
            labels = torch.where(drop, torch.full_like(labels, self.unet.num_classes), labels)
        noise = self._dev(torch.randn(x0.shape, generator=gen))
        if cfg.loss == "edm":
            sd = cfg.sigma_data
            sigma = self._dev((torch.randn(cfg.batch_size, generator=gen) * cfg.P_std + cfg.P_mean).exp())
            s = sigma[:, None, None, None]
            c_skip, c_out, c_in, c_noise = edm_coefficients(s, sd)
            with self.autocast:
                F_pred = net(c_in * (x0 + s * noise), c_noise.reshape(-1), class_labels=labels)
            D = c_skip * (x0 + s * noise) + c_out * F_pred.float()
            weight = (s**2 + sd**2) / (s * sd) ** 2
            return (weight * (D - x0) ** 2).mean()
        if cfg.loss == "flow":
            t = self._dev(torch.sigmoid(torch.randn(cfg.batch_size, generator=gen) * cfg.logit_std + cfg.logit_mean))
            tb = t[:, None, None, None]
            with self.autocast:
                v = net((1 - tb) * x0 + tb * noise, 1000.0 * t, class_labels=labels)
            return ((v.float() - (noise - x0)) ** 2).mean()
        t = self._dev(torch.randint(0, self.vp.num_train_timesteps, (cfg.batch_size,), generator=gen))  # type: ignore
        abar = self.abar[t][:, None, None, None]  # type: ignore[index]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        with self.autocast:
            eps = net(x_t, t.to(torch.float32), class_labels=labels)
        return ((eps.float() - noise) ** 2).mean()

    def update(self, loss: torch.Tensor) -> None:
        """One optimizer step (warm-up learning rate, gradient clipping) and the EMA of the weights."""
        cfg = self.cfg
        lr = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup)) if cfg.warmup else cfg.lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for pe, pn in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(pn, 1 - decay)
            for be, bn in zip(self.ema.buffers(), self.net.buffers()):
                be.copy_(bn)
        self.step += 1

    def flush(self) -> None:
        """Read the pending losses back in one synchronisation; a non-finite one stops training."""
        if not self.pending:
            return
        vals = torch.stack([v for _, v in self.pending]).tolist()
        steps_ = [k for k, _ in self.pending]
        self.pending.clear()
        for k, v in zip(steps_, vals):
            if not np.isfinite(v):
                raise FloatingPointError(f"training loss became {v} at step {k}; lower the learning rate")
        self.losses.extend(vals)
        self.bar.set_postfix(loss=f"{np.mean(self.losses[-LOSS_WINDOW:]):.4f}")

    def config(self, stopped: bool) -> dict[str, Any]:
        """The checkpoint's ``config.json``."""
        tail = self.losses[-LOSS_WINDOW:]
        return {
            "schema": ckpt.CHECKPOINT_SCHEMA, "objective": self.cfg.loss,
            "architecture": {"type": "unet", **self.unet.to_dict()},
            "precond": self.precond, "process": self.process_cfg, "data": self.data_info,
            "training": {
                **asdict(self.cfg), "step": self.step, "wall_s": round(self.wall_s(), 2),
                "loss_last200": float(np.mean(tail)) if tail else None, "stopped_early": stopped,
                "torch": torch.__version__, "threads": torch.get_num_threads(),
            },
            "weights": {"file": ckpt.WEIGHTS_FILE, "ema": True, "dtype": self.cfg.weights_dtype,
                        "n_params": self.net.num_parameters()},
            "device": str(self.device),
        }

    def wall_s(self) -> float:
        return self.wall_prev + time.perf_counter() - self.t0

    def checkpoint(self, stopped: bool = False) -> None:
        """Write the checkpoint.  ``train_state.pt`` holds what resuming needs besides ``model.safetensors``:
        the raw weights, AdamW's two moment estimates (together three times the weights), the random
        states and the losses; the EMA weights only when ``model.safetensors`` keeps them in float16."""
        self.flush()
        ema = _to_cpu(self.ema.state_dict())
        state = {
            "step": self.step, "model": _to_cpu(self.net.state_dict()),
            "ema": ema if self.cfg.weights_dtype != "float32" else None,
            "opt": _to_cpu(self.opt.state_dict()), "gen": self.gen.get_state(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device).cpu() if self.device.type == "cuda" else None,
            "wall_s": self.wall_s(), "losses": self.losses, "unet": self.unet.to_dict(), "loss": self.cfg.loss,
            "fingerprint": self.data_info["fingerprint"], "holdout": self.data_info["holdout"]["indices"],
        }
        ckpt.save_checkpoint(self.out, self.config(stopped), ema, state,
                             weights_dtype=getattr(torch, self.cfg.weights_dtype))

    def run(self, progress: bool, callback: Callable[[dict], None] | None) -> TrainResult:
        """Iterate up to ``cfg.iters`` (or the time limit), with checkpoints; Ctrl-C keeps one."""
        cfg = self.cfg
        self._to_device()
        self.t0 = time.perf_counter()
        stopped = False
        self.net.train()
        self.bar = tqdm(total=cfg.iters, initial=min(self.step, cfg.iters), disable=not progress, desc="train",
                        dynamic_ncols=True)
        try:
            while self.step < cfg.iters:
                loss = self.batch_loss()
                self.update(loss)
                self.pending.append((self.step - 1, loss.detach()))
                self.bar.update(1)
                if self.step % cfg.log_every == 0:
                    self.flush()
                if callback is not None:
                    callback({"step": self.step, "loss": float(loss.detach())})
                if self.step % cfg.ckpt_every == 0 and self.step < cfg.iters:
                    self.checkpoint()
                if cfg.time_limit_s is not None and time.perf_counter() - self.t0 > cfg.time_limit_s \
                        and self.step < cfg.iters:
                    stopped = True
                    break
        except KeyboardInterrupt:
            self.bar.close()
            if self.step > 0:
                self.checkpoint(stopped=True)  # after a non-finite loss: raises that instead, the last good one stays
            raise
        self.bar.close()
        self.checkpoint(stopped)
        tail = self.losses[-LOSS_WINDOW:]
        return TrainResult(out=self.out, step=self.step, wall_s=self.wall_s(),
                           loss=float(np.mean(tail)) if tail else float("nan"), loss_iters=len(tail),
                           n_params=self.net.num_parameters(), config=self.config(stopped), stopped_early=stopped)
