"""Train a small U-Net denoiser on images: datasets, the training loop and checkpoints.

Losses
    ``edm`` (default): Karras et al. 2022, Eq. 8 with their training recipe (Sec. 5, Table 1):
    ``ln sigma ~ N(P_mean, P_std^2)`` (``P_mean = -1.2``, ``P_std = 1.2``), loss weight
    ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``, denoiser ``D = EDMPrecond(UNet)`` with
    ``sd = sigma_data = 0.5``.
    ``vp-eps``: epsilon prediction on a discrete VP process (DDPM, Ho et al. 2020, linear betas,
    1000 steps, uniform timesteps), used through :class:`~steindiff.models.VPDenoiser`.

Datasets (all end up as float32 ``N x C x H x W`` in ``[-1, 1]``)
    ``digits``: scikit-learn's bundled 8x8 digits (1797 images, values 0..16 scaled to [-1, 1],
    with labels).  A fixed, seeded split of 297 images is held out from training for evaluation.
    ``*.npy`` / ``*.npz``: an array ``N x C x H x W``.  Floating-point arrays must already be in
    ``[-1, 1]``; integer arrays must be in ``[0, 255]`` (8-bit images) and are scaled to ``[-1, 1]``.
    In a ``.npz``, images are the array named ``x``, ``images``, ``data`` or ``samples`` (or its only
    array); labels (optional) are ``y`` or ``labels``.
    a folder of ``*.png``: 8-bit images of one size, read in sorted name order, grayscale if all
    are grayscale else RGB (alpha dropped), scaled from ``[0, 255]`` to ``[-1, 1]``.

Checkpoints are folders: ``model.safetensors`` (EMA weights), ``config.json`` (architecture,
preconditioning, process, data shape and split, training stats) and ``train_state.pt`` (raw weights,
optimizer, RNG states: for resuming).  A checkpoint is written into a temporary sibling folder and
swapped in by renames, so an interrupted run leaves the last complete checkpoint intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .models.denoisers import EDMPrecond, VPDenoiser
from .models.unet import UNet, UNetConfig
from .noise import DiscreteVPProcess, NoiseProcess, VEProcess

__all__ = [
    "ImageDataset", "DataError", "CheckpointError", "TrainConfig", "TrainResult",
    "load_dataset", "split_indices", "train", "save_checkpoint", "load_checkpoint",
    "build_denoiser", "CHECKPOINT_SCHEMA", "DIGITS_HOLDOUT", "LOSSES", "PRECISIONS",
]

CHECKPOINT_SCHEMA = "steindiff.checkpoint/1"
DIGITS_HOLDOUT = 297
LOSSES = ("edm", "vp-eps")
PRECISIONS = ("fp32", "bf16")
WEIGHTS_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "config.json", "train_state.pt"


class DataError(ValueError):
    """A dataset that cannot be used (the message names the file and what is wrong)."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded (the message names the file and what is wrong)."""


# --------------------------------------------------------------------------------------------
# datasets


@dataclass
class ImageDataset:
    """Images ``x`` (float32, ``N x C x H x W`` in ``[-1, 1]``), optional integer ``labels``."""

    x: torch.Tensor
    labels: torch.Tensor | None
    source: str
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of the float32 image bytes."""
        return hashlib.sha256(self.x.contiguous().numpy().tobytes()).hexdigest()[:16]


def load_digits_dataset() -> ImageDataset:
    """scikit-learn's 8x8 digits, ``N x 1 x 8 x 8`` scaled from 0..16 to [-1, 1], with labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 8.0 - 1.0)[:, None]
    return ImageDataset(x=x.contiguous(), labels=torch.from_numpy(np.asarray(d.target, dtype=np.int64)), source="digits", name="digits")


def _check_images(arr: np.ndarray, where: str) -> np.ndarray:
    """Validate and scale an ``N x C x H x W`` array to float32 in [-1, 1]."""
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{where}: images must be a float or integer array, got dtype {arr.dtype}")
    if arr.ndim != 4:
        hint = " (add a channel axis: x[:, None])" if arr.ndim == 3 else ""
        raise DataError(f"{where}: images must have rank 4 (N x C x H x W), got shape {arr.shape}{hint}")
    n, c, h, w = arr.shape
    if n == 0:
        raise DataError(f"{where}: the array holds no images (shape {arr.shape})")
    if c > 4 and w <= 4:
        raise DataError(f"{where}: shape {arr.shape} looks channels-last; transpose to N x C x H x W")
    if c > 4:
        raise DataError(f"{where}: {c} channels; expected 1 to 4 (N x C x H x W)")
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer images must be 8-bit values in [0, 255], got range [{lo}, {hi}]")
        return (arr.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(n, -1).any(1).sum())
        raise DataError(f"{where}: {bad} image(s) contain NaN or Inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1 - 1e-4 or hi > 1 + 1e-4:
        raise DataError(
            f"{where}: float images must be in [-1, 1], got range [{lo:.4g}, {hi:.4g}] "
            "(scale them: x / 127.5 - 1 for 0..255 data, 2 x - 1 for 0..1 data)"
        )
    if lo >= 0 and hi <= 1 and hi - lo > 0:
        warnings.warn(f"{where}: float images lie in [0, 1]; the model expects [-1, 1] data (use 2 x - 1 if these are 0..1 images)", stacklevel=3)
    return np.clip(arr, -1, 1)


def _check_labels(y: Any, n: int, where: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and y.min() < 0):
        raise DataError(f"{where}: labels must be non-negative integers of shape ({n},), got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def _load_array(path: Path) -> ImageDataset:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read as a NumPy array file: {e}") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if not keys:
                raise DataError(f"{path}: the .npz archive holds no arrays")
            img_key = next((k for k in ("x", "images", "data", "samples") if k in keys), None)
            if img_key is None:
                others = [k for k in keys if k not in ("y", "labels")]
                if len(others) != 1:
                    raise DataError(f"{path}: cannot tell which array holds the images among {keys}; name it 'x' or 'images'")
                img_key = others[0]
            arr = loaded[img_key]
            lab_key = next((k for k in ("y", "labels") if k in keys), None)
            raw_labels = loaded[lab_key] if lab_key else None
        where = f"{path}[{img_key!r}]"
    else:
        arr, raw_labels, where = loaded, None, str(path)
    x = _check_images(arr, where)
    if raw_labels is not None:
        labels = _check_labels(raw_labels, x.shape[0], f"{path}[labels]")
    return ImageDataset(x=torch.from_numpy(x).contiguous(), labels=labels, source=str(path.resolve()), name=path.stem)


def _load_png_folder(path: Path) -> ImageDataset:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise DataError(f"{path}: folder contains no .png images")
    imgs, modes, size = [], set(), None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    raise DataError(f"{f}: {im.mode} images are not supported; save 8-bit PNGs")
                gray = im.mode in ("1", "L", "LA")
                imgs.append(im.convert("L" if gray else "RGB"))
                modes.add("L" if gray else "RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(f"{f}: not a readable PNG image ({e})") from None
        if size is None:
            size = imgs[-1].size
        elif imgs[-1].size != size:
            raise DataError(f"{f}: size {imgs[-1].size[0]}x{imgs[-1].size[1]} differs from {size[0]}x{size[1]} of {files[0].name}")
    mode = "RGB" if "RGB" in modes else "L"
    arrs = [np.asarray(im.convert(mode), dtype=np.uint8) for im in imgs]
    arr = np.stack(arrs)
    arr = arr[:, None] if mode == "L" else arr.transpose(0, 3, 1, 2)
    x = _check_images(np.ascontiguousarray(arr), str(path))
    return ImageDataset(x=torch.from_numpy(x).contiguous(), labels=None, source=str(path.resolve()), name=path.name)


def load_dataset(spec: str | os.PathLike) -> ImageDataset:
    """``"digits"``, a ``.npy``/``.npz`` file or a folder of PNG images (see the module doc)."""
    if str(spec) == "digits":
        return load_digits_dataset()
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (use 'digits', a .npy/.npz file or a folder of .png images)")
    if path.is_dir():
        return _load_png_folder(path)
    if path.suffix.lower() in (".npy", ".npz"):
        return _load_array(path)
    raise DataError(f"{path}: unsupported dataset file; use a .npy/.npz array or a folder of .png images")


def split_indices(n: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted (train, held-out) index arrays."""
    if not 0 <= holdout < n:
        raise DataError(f"cannot hold out {holdout} of {n} images: need 0 <= holdout < {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])


# --------------------------------------------------------------------------------------------
# configuration


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
    holdout: int | None = None  # None: 297 for digits, 0 otherwise
    split_seed: int = 0
    seed: int = 0
    label_dropout: float = 0.1
    ckpt_every: int = 1000
    time_limit_s: float | None = None
    precision: str = "fp32"  # or "bf16": autocast of the network's forward pass (weights and loss stay float32)
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
        if self.sigma_data <= 0 or self.P_std <= 0:
            raise ValueError("sigma_data and P_std must be > 0")
        if self.holdout is not None and self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")


def _vp_process_config() -> dict[str, Any]:
    return {"type": "vp-discrete", "beta_schedule": "linear", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02}


def make_process(cfg: dict[str, Any]) -> NoiseProcess:
    """The noise process described by a checkpoint's ``process`` entry."""
    kind = cfg.get("type")
    if kind == "ve":
        return VEProcess(cfg["sigma_min"], cfg["sigma_max"])
    if kind == "vp-discrete":
        return DiscreteVPProcess(beta_schedule=cfg["beta_schedule"], num_train_timesteps=cfg["num_train_timesteps"],
                                 beta_start=cfg["beta_start"], beta_end=cfg["beta_end"])
    raise ValueError(f"unknown process type {kind!r}")


def build_denoiser(net: torch.nn.Module, config: dict[str, Any]) -> tuple[torch.nn.Module, NoiseProcess]:
    """``(denoiser, process)`` for a network and its checkpoint config: ``EDMPrecond`` or ``VPDenoiser``."""
    pre, process = config["precond"], make_process(config["process"])
    if pre["type"] == "edm":
        return EDMPrecond(net, sigma_data=pre["sigma_data"], dtype=torch.float32), process
    if pre["type"] == "vp":
        return VPDenoiser(net, process, prediction=pre["prediction"], timestep="interp", dtype=torch.float32), process  # type: ignore[arg-type]
    raise ValueError(f"unknown preconditioning {pre['type']!r}")


# --------------------------------------------------------------------------------------------
# checkpoints


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _recover(path: Path) -> None:
    """Undo a swap interrupted between its two renames (``path`` gone, its previous copy kept)."""
    if path.exists():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if olds:
        os.rename(olds[-1], path)


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True for a folder whose ``config.json`` carries the steindiff checkpoint schema."""
    p = Path(path)
    try:
        return json.loads((p / CONFIG_FILE).read_text()).get("schema") == CHECKPOINT_SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def save_checkpoint(path: str | os.PathLike, config: dict[str, Any], ema_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any] | None = None, *, weights_dtype: torch.dtype = torch.float32) -> Path:
    """Write a checkpoint folder atomically: into a temporary sibling, then swapped in by renames.

    An existing ``path`` must itself be a checkpoint (this never replaces an unrelated folder)."""
    from safetensors.torch import save_file

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write checkpoint {str(path)!r}: directory {str(parent)!r} does not exist")
    _recover(path)
    if path.exists() and not (path.is_dir() and (is_checkpoint_dir(path) or not any(path.iterdir()))):
        raise FileExistsError(f"{path}: exists and is not a steindiff checkpoint folder; refusing to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)
        tensors = {k: v.detach().to("cpu", weights_dtype).contiguous() for k, v in ema_state.items()}
        meta = {"schema": CHECKPOINT_SCHEMA, "step": str(config.get("training", {}).get("step", ""))}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=meta)
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(config, f, indent=1)
            f.write("\n")
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        for name in os.listdir(tmp):
            os.chmod(tmp / name, 0o666 & ~umask)
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists():
            old = parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``config.json``, checked for the keys a loader needs."""
    path = Path(path)
    _recover(path)
    cfile = path / CONFIG_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder not found")
    if not cfile.is_file():
        raise CheckpointError(f"{cfile}: missing (a checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(cfile.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfile}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("schema") != CHECKPOINT_SCHEMA:
        raise CheckpointError(f"{cfile}: not a steindiff checkpoint config (expected schema {CHECKPOINT_SCHEMA!r})")
    for key in ("architecture", "precond", "process", "data"):
        if key not in config:
            raise CheckpointError(f"{cfile}: missing the {key!r} entry")
    return config


def load_checkpoint(path: str | os.PathLike) -> tuple[UNet, dict[str, Any]]:
    """Build the U-Net of a checkpoint folder and load its (EMA) weights, in eval mode.

    Raises :class:`CheckpointError` naming the file when the config is missing or invalid, the
    weights are missing or corrupt, or the weights do not match the architecture in the config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = read_config(path)
    arch = dict(config["architecture"])
    if arch.pop("type", "unet") != "unet":
        raise CheckpointError(f"{path / CONFIG_FILE}: unsupported architecture type")
    try:
        net = UNet(UNetConfig.from_dict(arch))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid architecture: {e}") from None
    wfile = path / WEIGHTS_FILE
    if not wfile.is_file():
        raise CheckpointError(f"{wfile}: missing weights file")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{wfile}: corrupt or unreadable safetensors file ({e})") from None
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es) (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)} from the config)")
        raise CheckpointError(f"{wfile}: weights do not match the architecture in {CONFIG_FILE}: " + "; ".join(parts))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{wfile}: tensor {bad[0]} contains NaN or Inf")
    net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    net.eval()
    return net, config


# --------------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    out: Path
    step: int
    wall_s: float
    loss: float
    n_params: int
    config: dict[str, Any]
    stopped_early: bool = False


def _to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor on the CPU: checkpoints load on any device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup)) if cfg.warmup else cfg.lr


def train(
    cfg: TrainConfig,
    out: str | os.PathLike,
    unet: UNetConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    dataset: ImageDataset | None = None,
    callback: Callable[[dict], None] | None = None,
    device: str | torch.device | None = None,
) -> TrainResult:
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
    _recover(out)
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    holdout = cfg.holdout if cfg.holdout is not None else (DIGITS_HOLDOUT if ds.source == "digits" else 0)
    train_idx, held_idx = split_indices(ds.x.shape[0], holdout, cfg.split_seed)
    x_train = ds.x[torch.from_numpy(train_idx)]
    y_train = ds.labels[torch.from_numpy(train_idx)] if ds.labels is not None else None
    c, h, w = ds.shape
    if unet is None:
        unet = UNetConfig(in_channels=c, embedding="fourier" if cfg.loss == "edm" else "positional")
    if unet.in_channels != c:
        raise DataError(f"{cfg.data}: images have {c} channel(s) but the U-Net expects {unet.in_channels}")
    f = 2 ** (len(unet.channel_mult) - 1)
    if h % f or w % f:
        raise DataError(f"{cfg.data}: image size {h}x{w} is not divisible by {f}; use fewer levels (channel_mult)")
    if unet.num_classes and y_train is None:
        raise DataError(f"{cfg.data}: a class-conditional U-Net (num_classes={unet.num_classes}) needs labels")
    if unet.num_classes and y_train is not None and int(y_train.max()) >= unet.num_classes:
        raise DataError(f"{cfg.data}: label {int(y_train.max())} >= num_classes {unet.num_classes}")

    device = torch.device(device) if device is not None else ds.x.device
    torch.manual_seed(cfg.seed)
    net = UNet(unet)
    ema = UNet(unet)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, wall_prev, losses = 0, 0.0, []

    data_info = {
        "source": ds.source, "name": ds.name, "shape": [c, h, w], "range": [-1.0, 1.0],
        "n_total": int(ds.x.shape[0]), "n_train": int(len(train_idx)), "fingerprint": ds.fingerprint(),
        "holdout": {"n": int(holdout), "seed": int(cfg.split_seed), "indices": [int(i) for i in held_idx]},
        "has_labels": ds.labels is not None,
    }
    if cfg.loss == "edm":
        precond = {"type": "edm", "sigma_data": cfg.sigma_data}
        process_cfg = {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0}
    else:
        precond = {"type": "vp", "prediction": "epsilon"}
        process_cfg = _vp_process_config()
    vp = make_process(process_cfg) if cfg.loss == "vp-eps" else None

    if resume:
        sfile = out / STATE_FILE
        if not sfile.is_file():
            raise CheckpointError(f"{sfile}: nothing to resume from (no training state)")
        try:
            st = torch.load(sfile, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{sfile}: corrupt or unreadable training state ({e})") from None
        if st.get("unet") != unet.to_dict():
            raise CheckpointError(f"{sfile}: architecture differs from the requested one ({st.get('unet')} vs {unet.to_dict()})")
        if st.get("loss") != cfg.loss or st.get("fingerprint") != data_info["fingerprint"] or st.get("holdout") != data_info["holdout"]["indices"]:
            raise CheckpointError(f"{sfile}: was trained with another loss, dataset or split; start a new run in another folder")
        try:
            net.load_state_dict(st["model"])
            ema.load_state_dict(st["ema"])
            opt.load_state_dict(st["opt"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{sfile}: training state does not match the model ({e})") from None
        gen.set_state(st["gen"])
        torch.set_rng_state(st["rng"])
        if device.type == "cuda" and st.get("cuda_rng") is not None:  # dropout's stream, when resumed on CUDA
            torch.cuda.set_rng_state(st["cuda_rng"], device)
        step, wall_prev, losses = int(st["step"]), float(st["wall_s"]), list(st["losses"])
    elif out.exists() and (is_checkpoint_dir(out) or (out / STATE_FILE).exists()):
        raise FileExistsError(f"{out}: a checkpoint already exists; resume it or choose another folder")
    elif out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder")

    net.to(device)
    ema.to(device)
    # the optimizer's state follows its parameters (moved, or restored onto them above)
    for group_state in opt.state.values():
        for k, v in group_state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                group_state[k] = v.to(device)
    x_train_d = x_train.to(device)
    labels_d = y_train.to(device) if y_train is not None else None
    abar_d = vp.alphas_cumprod.to(device, torch.float32) if vp is not None else None  # type: ignore[union-attr]
    n_train = x_train.shape[0]
    sd = cfg.sigma_data
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device) not yet read back

    def to_dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)  # no host synchronisation (pageable memory is staged)

    def flush() -> None:
        """Read the pending losses back in one synchronisation; a non-finite one stops training."""
        if not pending:
            return
        vals = torch.stack([v for _, v in pending]).tolist()
        steps_ = [k for k, _ in pending]
        pending.clear()
        for k, v in zip(steps_, vals):
            if not np.isfinite(v):
                raise FloatingPointError(f"training loss became {v} at step {k}; lower the learning rate")
        losses.extend(vals)
        bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")

    def make_config(stopped: bool) -> dict[str, Any]:
        tail = losses[-200:]
        return {
            "schema": CHECKPOINT_SCHEMA,
            "architecture": {"type": "unet", **unet.to_dict()},
            "precond": precond,
            "process": process_cfg,
            "data": data_info,
            "training": {
                **{k: v for k, v in asdict(cfg).items()}, "step": step, "wall_s": round(wall_prev + time.perf_counter() - t0, 2),
                "loss_last200": float(np.mean(tail)) if tail else None, "stopped_early": stopped,
                "torch": torch.__version__, "threads": torch.get_num_threads(),
            },
            "weights": {"file": WEIGHTS_FILE, "ema": True, "dtype": "float32", "n_params": net.num_parameters()},
            "device": str(device),
        }

    def checkpoint(stopped: bool = False) -> None:
        flush()
        state = {
            "step": step, "model": _to_cpu(net.state_dict()), "ema": _to_cpu(ema.state_dict()),
            "opt": _to_cpu(opt.state_dict()), "gen": gen.get_state(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None,
            "wall_s": wall_prev + time.perf_counter() - t0,
            "losses": losses, "unet": unet.to_dict(), "loss": cfg.loss, "fingerprint": data_info["fingerprint"],
            "holdout": data_info["holdout"]["indices"],
        }
        save_checkpoint(out, make_config(stopped), state["ema"], state)

    t0 = time.perf_counter()
    stopped = False
    net.train()
    bar = tqdm(total=cfg.iters, initial=min(step, cfg.iters), disable=not progress, desc="train", dynamic_ncols=True)
    try:
        while step < cfg.iters:
            # every random number from the CPU generator (the same stream on any device), then moved
            idx = torch.randint(0, n_train, (cfg.batch_size,), generator=gen)
            x0 = x_train_d[to_dev(idx)]
            labels = None
            if unet.num_classes:
                labels = labels_d[to_dev(idx)].clone()  # type: ignore[index]
                drop = to_dev(torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout)
                labels = torch.where(drop, torch.full_like(labels, unet.num_classes), labels)
            noise = to_dev(torch.randn(x0.shape, generator=gen))
            if cfg.loss == "edm":
                sigma = to_dev((torch.randn(cfg.batch_size, generator=gen) * cfg.P_std + cfg.P_mean).exp())
                s = sigma[:, None, None, None]
                c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
                with autocast:
                    F_pred = net(c_in * (x0 + s * noise), sigma.log() / 4, class_labels=labels)
                D = c_skip * (x0 + s * noise) + c_out * F_pred.float()
                weight = (s**2 + sd**2) / (s * sd) ** 2
                loss = (weight * (D - x0) ** 2).mean()
            else:
                t = to_dev(torch.randint(0, vp.num_train_timesteps, (cfg.batch_size,), generator=gen))  # type: ignore[union-attr]
                abar = abar_d[t][:, None, None, None]  # type: ignore[index]
                x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
                with autocast:
                    eps = net(x_t, t.to(torch.float32), class_labels=labels)
                loss = ((eps.float() - noise) ** 2).mean()
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pn in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(pn, 1 - decay)
                for be, bn in zip(ema.buffers(), net.buffers()):
                    be.copy_(bn)
            step += 1
            pending.append((step - 1, loss.detach()))
            bar.update(1)
            if step % cfg.log_every == 0:
                flush()
            if callback is not None:
                callback({"step": step, "loss": float(loss.detach())})
            if step % cfg.ckpt_every == 0 and step < cfg.iters:
                checkpoint()
            if cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s and step < cfg.iters:
                stopped = True
                break
    except KeyboardInterrupt:
        bar.close()
        if step > 0:
            checkpoint(stopped=True)  # after a non-finite loss: raises that instead, the last good checkpoint stays
        raise
    bar.close()
    checkpoint(stopped)
    return TrainResult(out=out, step=step, wall_s=wall_prev + time.perf_counter() - t0,
                       loss=float(np.mean(losses[-200:])) if losses else float("nan"),
                       n_params=net.num_parameters(), config=make_config(stopped), stopped_early=stopped)
