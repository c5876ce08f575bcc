"""Our code does not make torch warn.  Forward mode: torch loads its JVP decompositions on first use,
through the deprecated torch.jit.script; steindiff loads them quietly before each forward-mode entry.

(Warnings raised from steindiff.* itself are errors in every test: pyproject's filterwarnings.)"""

import subprocess
import sys
from pathlib import Path

import torch

from steindiff.diagnostics import lipschitz
from steindiff.stabilizers import divergence

# a fresh process: the decompositions are not loaded yet
CODE = """
import torch
from steindiff._forward_ad import load_quietly
load_quietly()
x = torch.randn(2, 3, dtype=torch.float64)
_, jv = torch.func.jvp(lambda z: 2 * z, (x,), (x,))  # would warn here if they were not loaded
assert torch.allclose(jv, 2 * x)
"""


def test_load_quietly_leaves_no_deprecation_warning():
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", CODE],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_forward_mode_entries_load_quietly_first(monkeypatch):
    calls = []
    for module in (lipschitz, divergence):
        monkeypatch.setattr(module, "load_quietly", lambda: calls.append(1))
    x = torch.randn(2, 3, dtype=torch.float64)
    lipschitz.local_lipschitz(lambda z: 2 * z, x, iters=1, jvp="forward")
    assert calls
    calls.clear()
    divergence.jvp_quadratic_forms(lambda z: 2 * z, x, torch.randn(1, 2, 3, dtype=torch.float64))
    assert calls
