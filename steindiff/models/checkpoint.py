"""Checkpoint folders of trained U-Nets: the process and denoiser a config describes, and reading
and writing checkpoints.

A checkpoint is a folder: ``model.safetensors`` (EMA weights), ``config.json`` (architecture,
preconditioning, process, data shape and split, training stats) and ``train_state.pt`` (raw weights,
optimizer, RNG states: for resuming, :mod:`steindiff.train`).  It is written into a temporary sibling
folder and swapped in by renames, so an interrupted write leaves the last complete checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..noise import DiscreteVPProcess, FlowProcess, NoiseProcess, VEProcess
from ..schedules import FlowSchedule
from .denoisers import EDMPrecond, FlowDenoiser, VPDenoiser
from .unet import UNet, UNetConfig

__all__ = ["CheckpointError", "CHECKPOINT_SCHEMA", "make_process", "build_denoiser", "is_checkpoint_dir",
           "save_checkpoint", "read_config", "load_checkpoint", "recover", "VP_PROCESS",
           "WEIGHTS_FILE", "CONFIG_FILE", "STATE_FILE"]

CHECKPOINT_SCHEMA = "steindiff.checkpoint/1"
WEIGHTS_FILE, CONFIG_FILE, STATE_FILE = "model.safetensors", "config.json", "train_state.pt"
#: The process of ``vp-eps`` training: DDPM's linear betas over 1000 steps.
VP_PROCESS = {"type": "vp-discrete", "beta_schedule": "linear", "num_train_timesteps": 1000, "beta_start": 0.0001,
              "beta_end": 0.02}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded (the message names the file and what is wrong)."""


def make_process(cfg: dict[str, Any]) -> NoiseProcess:
    """The noise process described by a checkpoint's ``process`` entry."""
    kind = cfg.get("type")
    if kind == "ve":
        return VEProcess(cfg["sigma_min"], cfg["sigma_max"])
    if kind == "vp-discrete":
        return DiscreteVPProcess(beta_schedule=cfg["beta_schedule"], num_train_timesteps=cfg["num_train_timesteps"],
                                 beta_start=cfg["beta_start"], beta_end=cfg["beta_end"])
    if kind == "flow":  # the VE noise range, and the shift of the "flow" schedule
        return FlowProcess.from_sigmas(cfg["sigma_min"], cfg["sigma_max"], FlowSchedule(shift=cfg.get("shift", 1.0)))
    raise ValueError(f"unknown process type {kind!r}")


def build_denoiser(net: torch.nn.Module, config: dict[str, Any]) -> tuple[torch.nn.Module, NoiseProcess]:
    """``(denoiser, process)`` for a network and its checkpoint config: ``EDMPrecond``, ``VPDenoiser`` or (a
    ``flow`` objective) ``FlowDenoiser``."""
    pre, process = config["precond"], make_process(config["process"])
    if pre["type"] == "edm":
        return EDMPrecond(net, sigma_data=pre["sigma_data"], dtype=torch.float32), process
    if pre["type"] == "vp":
        return VPDenoiser(net, process, prediction=pre["prediction"], timestep="interp",
                          dtype=torch.float32), process  # type: ignore[arg-type]
    if pre["type"] == "flow":
        return FlowDenoiser(net, process, prediction=pre["prediction"], time_scale=pre["time_scale"],  # type: ignore
                            dtype=torch.float32), process
    raise ValueError(f"unknown preconditioning {pre['type']!r}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def recover(path: Path) -> None:
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
    recover(path)
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
    recover(path)
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
            parts.append(f"{len(wrong)} shape mismatch(es) (e.g. {k}: {tuple(state[k].shape)} vs "
                         f"{tuple(expected[k].shape)} from the config)")
        raise CheckpointError(f"{wfile}: weights do not match the architecture in {CONFIG_FILE}: " + "; ".join(parts))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{wfile}: tensor {bad[0]} contains NaN or Inf")
    net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    net.eval()
    return net, config

