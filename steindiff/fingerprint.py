"""Content fingerprints of models: what a calibration cache keys a model by.

:func:`fingerprint` hashes whatever determines a model's output: the weights and buffers of an
``nn.Module`` and every plain attribute it carries (a prediction type, a noise process's table, the
mixture a wrapper closes over), and for a Python function its code, default arguments, the values its
closure holds and the globals it reads.  Two models that compute differently get different
fingerprints; a wrapper without parameters no longer shares the fingerprint of every other such wrapper.

A model built only from objects that cannot be read (a compiled extension, a C callable) has no
fingerprint: :class:`AmbiguousIdentity` asks for an explicit one (``fingerprint=`` in Python,
``--model-name`` on the command line).
"""

from __future__ import annotations

import functools
import hashlib
import types
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["fingerprint", "AmbiguousIdentity"]

_MAX_DEPTH = 12
# nn.Module internals that are not part of what it computes (hooks are callables registered by tools)
_MODULE_SKIP = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_backward_pre_hooks",
                "_backward_hooks", "_is_full_backward_hook", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
                "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks", "_compiled_call_impl"}
# tensor bytes are hashed once per tensor and version (a large model is read once per process)
# (keyed by id: tensors compare elementwise, so they cannot be dictionary keys; the weak reference tells a
# live tensor from a new one at a reused address)
_tensor_digests: dict[int, tuple[weakref.ref, tuple, bytes]] = {}


class AmbiguousIdentity(ValueError):
    """A model whose output cannot be told from its contents: it needs an explicit fingerprint."""


def _tensor_digest(t: torch.Tensor) -> bytes:
    # the version counts in-place changes; the data pointer, dtype and layout see ``t.data = other`` (what
    # ``module.float()`` and weight swaps do), which leaves the version as it was
    version = (getattr(t, "_version", 0), t.data_ptr() if t.device.type != "meta" else 0, t.dtype, tuple(t.shape),
               t.stride(), str(t.device))
    hit = _tensor_digests.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == version:
        return hit[2]
    d = t.detach()
    if d.device.type == "meta":
        raise AmbiguousIdentity("a tensor on the meta device has no values to fingerprint")
    d = d.cpu().contiguous()
    digest = hashlib.sha256(d.reshape(-1).view(torch.uint8).numpy().tobytes() if d.numel() else b"").digest()
    try:
        key = id(t)
        _tensor_digests[key] = (weakref.ref(t, lambda _, key=key: _tensor_digests.pop(key, None)), version, digest)
    except TypeError:  # not weak-referenceable: not memoised
        pass
    return digest


class _Hasher:
    """A depth-first walk that feeds an object's contents to one sha256, counting what it could read."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.content = 0  # tensors, arrays, numbers and code read: zero means nothing determined the output
        self.seen: dict[int, int] = {}
        self.opaque: list[str] = []

    def tag(self, s: str) -> None:
        self.h.update(s.encode())
        self.h.update(b"\x00")

    def feed(self, obj: Any, path: str, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            self.tag("<deep>")
            return
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            self.tag(f"{type(obj).__name__}:{obj!r}")
            self.content += 1
            return
        if isinstance(obj, (torch.dtype, torch.device, torch.Size, types.ModuleType, type)):
            self.tag(f"{type(obj).__name__}:{getattr(obj, '__qualname__', None) or obj!r}")
            return
        key = id(obj)
        if key in self.seen:  # a cycle or a shared object: its position, not its contents again
            self.tag(f"<ref {self.seen[key]}>")
            return
        self.seen[key] = len(self.seen)
        if isinstance(obj, torch.Tensor):
            self.tag(f"tensor:{obj.dtype}:{tuple(obj.shape)}:{type(obj).__name__}")
            self.h.update(_tensor_digest(obj))
            self.content += 1
        elif isinstance(obj, np.ndarray):
            self.tag(f"ndarray:{obj.dtype}:{obj.shape}")
            self.h.update(np.ascontiguousarray(obj).tobytes())
            self.content += 1
        elif isinstance(obj, nn.Module):
            self.module(obj, path, depth)
        elif isinstance(obj, dict):
            self.tag(f"dict:{len(obj)}")
            for k in sorted(obj, key=repr):
                self.tag(repr(k))
                self.feed(obj[k], f"{path}[{k!r}]", depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
            self.tag(f"{type(obj).__name__}:{len(items)}")
            for i, v in enumerate(items):
                self.feed(v, f"{path}[{i}]", depth + 1)
        elif isinstance(obj, types.CodeType):
            self.code(obj, path, depth)
        elif isinstance(obj, types.FunctionType):
            self.function(obj, path, depth)
        elif isinstance(obj, types.MethodType):
            self.tag("method")
            self.feed(obj.__func__, f"{path}.__func__", depth + 1)
            self.feed(obj.__self__, f"{path}.__self__", depth + 1)
        elif isinstance(obj, functools.partial):
            self.tag("partial")
            self.feed(obj.func, f"{path}.func", depth + 1)
            self.feed(obj.args, f"{path}.args", depth + 1)
            self.feed(obj.keywords, f"{path}.keywords", depth + 1)
        elif hasattr(obj, "__dict__") or hasattr(type(obj), "__slots__"):
            self.tag(f"object:{type(obj).__module__}.{type(obj).__qualname__}")
            self.attributes(obj, path, depth)
        else:  # a C object without readable state (a builtin, a generator, a stream, ...)
            self.tag(f"opaque:{type(obj).__module__}.{type(obj).__qualname__}")
            self.opaque.append(f"{path} ({type(obj).__qualname__})")

    def attributes(self, obj: Any, path: str, depth: int, skip: set[str] = frozenset()) -> None:
        names = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
        for cls in type(obj).__mro__:
            for s in getattr(cls, "__slots__", ()):
                if isinstance(s, str) and s not in ("__dict__", "__weakref__") and hasattr(obj, s):
                    names.setdefault(s, getattr(obj, s))
        for name in sorted(names):
            if name in skip:
                continue
            self.tag(name)
            self.feed(names[name], f"{path}.{name}", depth + 1)

    def module(self, m: nn.Module, path: str, depth: int) -> None:
        self.tag(f"module:{type(m).__module__}.{type(m).__qualname__}")
        for kind, table in (("param", m._parameters), ("buffer", m._buffers)):
            for name in sorted(table):
                self.tag(f"{kind}:{name}")
                self.feed(table[name], f"{path}.{name}", depth + 1)
        for name in sorted(m._modules):
            self.tag(f"child:{name}")
            self.feed(m._modules[name], f"{path}.{name}", depth + 1)
        self.attributes(m, path, depth, _MODULE_SKIP)
        self.content += 1  # its class's forward determines the output, with what was read above

    def code(self, co: types.CodeType, path: str, depth: int) -> None:
        self.tag(f"code:{co.co_name}")
        self.h.update(co.co_code)
        self.tag(repr(co.co_names))
        for c in co.co_consts:
            self.feed(c, f"{path}<const>", depth + 1)
        self.content += 1

    def function(self, fn: types.FunctionType, path: str, depth: int) -> None:
        self.tag(f"function:{fn.__module__}.{fn.__qualname__}")
        self.code(fn.__code__, path, depth)
        self.feed(fn.__defaults__, f"{path}.__defaults__", depth + 1)
        self.feed(fn.__kwdefaults__, f"{path}.__kwdefaults__", depth + 1)
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            self.tag(f"free:{name}")
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                value = None
            self.feed(value, f"{path}<closure {name}>", depth + 1)
        g = fn.__globals__
        for name in _global_names(fn.__code__):
            if name in g:
                self.tag(f"global:{name}")
                self.feed(g[name], f"{path}<global {name}>", depth + 1)


def _global_names(co: types.CodeType) -> list[str]:
    """The names a code object (and the code nested in it) may read as globals, sorted."""
    names = set(co.co_names)
    for c in co.co_consts:
        if isinstance(c, types.CodeType):
            names.update(_global_names(c))
    return sorted(names)


def fingerprint(model: Any) -> str:
    """A 16-hex-digit hash of what determines ``model``'s output (module docstring).

    Raises :class:`AmbiguousIdentity` when nothing readable determines it (every part opaque).  Parts
    that cannot be read (a stream, a lock) are named in nothing but their type: a model whose output
    depends on such a part needs an explicit fingerprint.
    """
    inner = getattr(model, "_orig_mod", None)  # torch.compile's wrapper: the compiled module's own contents
    model = inner if isinstance(inner, nn.Module) else model
    hasher = _Hasher()
    hasher.feed(model, "model")
    if hasher.content == 0:
        what = ", ".join(hasher.opaque[:3]) or type(model).__qualname__
        raise AmbiguousIdentity(f"cannot tell this model from another by its contents ({what} cannot be read)")
    return hasher.h.hexdigest()[:16]
