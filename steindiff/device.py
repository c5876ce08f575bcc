"""Devices: the ``--device`` names, where a model lives, and the check that a model and a state agree.

``--device``: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` (the current CUDA
device) or ``cuda:N``.  The Python API takes no device of its own: it follows the tensors and the
model it is given, and refuses (before any work) a model and a state on different devices.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["DeviceError", "resolve_device", "model_device", "same_device", "check_model_device", "describe_device",
           "is_out_of_memory", "tf32", "exact_float32"]


class DeviceError(ValueError):
    """A device that does not exist here, or a model and a state on different devices."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device named by ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``).

    Raises :class:`DeviceError` naming the device for anything else, for CUDA on a machine (or a
    torch build) without it, and for a CUDA index beyond the devices present."""
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name.strip().lower() if isinstance(name, str) else name)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise DeviceError(f"unsupported device {str(dev)!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise DeviceError(f"device {str(dev)!r} requested but CUDA is not available ({why}); use --device cpu or auto")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise DeviceError(f"device {str(dev)!r} requested but only {count} CUDA device(s) are visible "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def _norm(d: torch.device | str) -> torch.device:
    d = torch.device(d)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return d


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """``a`` and ``b`` are the same device (``cuda`` and ``cuda:<current>`` are equal)."""
    return _norm(a) == _norm(b)


def model_device(model: Any) -> torch.device | None:
    """The device of a model's parameters and buffers, or ``None`` when it cannot be told (a plain
    function, a model without tensors, or one spread over several devices).

    Handles ``nn.Module`` (parameters and buffers, submodules included), objects with a ``device``
    attribute (e.g. :class:`~steindiff.models.GaussianMixture`) and bound methods of either."""
    obj = getattr(model, "__self__", model)  # a bound method: its object
    if isinstance(obj, torch.nn.Module):
        devs = {_norm(t.device) for t in (*obj.parameters(), *obj.buffers())}
        return devs.pop() if len(devs) == 1 else None
    dev = getattr(obj, "device", None)
    if isinstance(dev, (torch.device, str)):
        try:
            return _norm(dev)
        except RuntimeError:
            return None
    return None


def check_model_device(model: Any, x: torch.Tensor, what: str = "the state x") -> None:
    """Refuse, before any work, a model on the ``meta`` device or on another device than ``x``.

    The message names both devices and how to move one of them."""
    dev = model_device(model)
    if dev is not None and dev.type == "meta":
        raise DeviceError("the model's parameters are on the meta device (created without weights); load its weights "
                          "(e.g. load_state_dict(..., assign=True) or to_empty(device=...)) before sampling")
    if x.device.type == "meta":
        raise DeviceError(f"{what} is on the meta device (a shape without data); create it on a real device")
    if dev is None:
        return
    if not same_device(dev, x.device):
        raise DeviceError(f"the model is on {dev} but {what} is on {x.device}; move one of them "
                          f"(model.to({str(x.device)!r}) or x.to({str(dev)!r}), or --device on the command line)")


def describe_device(device: torch.device | str) -> dict[str, Any]:
    """What a result file records about the device: its name and, on CUDA, the card and versions."""
    d = _norm(device)
    out: dict[str, Any] = {"device": str(d), "torch": torch.__version__}
    if d.type == "cuda":
        props = torch.cuda.get_device_properties(d)
        out.update(gpu=torch.cuda.get_device_name(d), gpu_memory_bytes=int(props.total_memory),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
                   tf32_cudnn=bool(torch.backends.cudnn.allow_tf32))
    return out


def is_out_of_memory(e: BaseException) -> bool:
    """An out-of-memory error of any device (``torch.OutOfMemoryError``, or a CPU allocator failure)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(e, (oom, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 on (``True``) or off for cuBLAS matmuls and cuDNN convolutions inside the block, the previous
    settings restored after; no effect on the CPU, which has no TF32."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def exact_float32() -> contextlib.AbstractContextManager[None]:
    """Full float32 arithmetic on CUDA inside the block (``tf32(False)``; also a decorator).

    TF32 keeps 10 mantissa bits (relative rounding about 5e-4, and PyTorch enables it for convolutions by
    default), the size of a finite-difference step: the calibrated sampler's derivative-free refinement
    (:func:`steindiff.trajectory.refine`) and its reference solve run inside this block."""
    return tf32(False)
