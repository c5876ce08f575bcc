"""Atomic file output: nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["atomic_path", "check_writable", "save_json", "save_npz", "to_jsonable"]


def check_writable(path: str | os.PathLike) -> Path:
    """Raise ``OSError`` naming ``path`` if a file cannot be created there (checked before work starts).

    It creates and removes a temporary file beside ``path``, as :func:`atomic_path` will: permission bits
    alone do not tell (root ignores them; ``/proc`` or a read-only mount refuses new files anyway)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise IsADirectoryError(f"output path {str(p)!r} is a directory")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(p)!r}: directory {str(parent)!r} does not exist")
    os.unlink(_temp_beside(p, ""))
    return p


def _temp_beside(p: Path, suffix: str) -> str:
    """A new empty temporary file in ``p``'s folder, or an ``OSError`` naming ``p`` (not the temporary name)."""
    parent = p.parent if str(p.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix, dir=parent)
    except OSError as e:
        raise PermissionError(f"cannot write {str(p)!r}: directory {str(parent)!r} is not writable "
                              f"({e.strerror or e})") from None
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    p = check_writable(path)
    tmp = _temp_beside(p, suffix or p.suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values and dataclass-like dicts to JSON-friendly types."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def save_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(to_jsonable(obj), f, indent=1)
            f.write("\n")


def save_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (a report) atomically, ending in one newline."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text.rstrip("\n") + "\n")


def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **{k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
                         for k, v in arrays.items()})
