"""Forward-mode AD without torch's deprecation noise.

On its first use in a process, torch's forward-mode AD (``torch.func.jvp``, ``forward_ad.dual_level``)
imports its JVP decompositions, which calls the deprecated ``torch.jit.script`` and so emits a
``DeprecationWarning`` the user can do nothing about.  :func:`load_quietly` does that import once,
with that one warning silenced; call it before entering forward mode.
"""

from __future__ import annotations

import warnings

import torch.autograd.forward_ad as fwAD

_loaded = False


def load_quietly() -> None:
    """Load torch's forward-mode decompositions now, without the ``torch.jit.script`` deprecation warning."""
    global _loaded
    if _loaded:
        return
    load = getattr(fwAD, "_maybe_load_decompositions", None)  # private in torch; absent: nothing to do
    if load is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                    category=DeprecationWarning)
            load()
    _loaded = True
